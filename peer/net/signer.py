"""The client side of peer.net.auth: the auth metadata every call we make carries (our id and key,
a timestamp, a nonce, a signature over the method, the timestamp, the nonce and the sha256 of the
first request message, and in a private run a proof of the secret), added by gRPC client
interceptors on every channel (`client.Channels`); in a private run, unary replies are checked
against their MAC before they are used."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
from collections.abc import AsyncIterator, Callable

import grpc
from hivemind.utils import get_dht_time

from peer.identity import Identity
from peer.net.auth import (
    ID,
    KEY,
    NONCE,
    PROOF,
    SIG,
    TS,
    derived_key,
    describe_secret_refusal,
    method_name,
    secret_key,
    signed_text,
)
from peer.net.chunkmac import ChunkMacs, check_reply


class Signer:
    """Makes the auth metadata of our calls; in a private run, unless `seal` is False (under TLS, which
    protects every byte), `macs` seals and checks the chunks of our streams (peer.net.chunkmac) and the
    unary replies we get are checked against their MAC (chunkmac.check_reply)."""

    def __init__(self, identity: Identity, secret: str = "", clock: Callable[[], float] = get_dht_time,
                 seal: bool = True):
        self.identity, self.key, self.clock = identity, secret_key(secret), clock
        self.macs = ChunkMacs(derived_key(secret, "chunk-mac") if seal else b"")
        self.reply_key = derived_key(secret, "reply-mac") if seal else b""
        self.on_refused: Callable[[str], None] | None = None   # called with the line to print (Node: exit 3)

    def watch(self, call) -> None:
        """Looks at how `call` ended: a refusal of our run secret goes to `on_refused`."""
        def done(c) -> None:
            if self.on_refused is not None and not c.cancelled():
                asyncio.ensure_future(self._check(c))

        call.add_done_callback(done)

    async def _check(self, call) -> None:
        try:
            if await call.code() != grpc.StatusCode.UNAUTHENTICATED:
                return
            line = describe_secret_refusal(await call.details() or "")
        except Exception:   # the call's end is only a hint here
            return
        if line and self.on_refused is not None:
            self.on_refused(line)

    def metadata(self, method: str, first: bytes) -> tuple[tuple[str, str], ...]:
        ts, nonce = f"{self.clock():.3f}", os.urandom(12).hex()
        text = signed_text(method, ts, nonce, hashlib.sha256(first).hexdigest())
        md = ((ID, self.identity.peer_id), (KEY, self.identity.public_key.decode()), (TS, ts), (NONCE, nonce),
              (SIG, self.identity.sign(text).decode()))
        if self.key:
            md += ((PROOF, hmac.new(self.key, text, hashlib.sha256).hexdigest()),)
        return md

    def details(self, details, first: bytes):
        md = tuple(details.metadata or ()) + self.metadata(method_name(details), first)
        return details._replace(metadata=grpc.aio.Metadata(*md)) if hasattr(details, "_replace") else \
            grpc.aio.ClientCallDetails(details.method, details.timeout, grpc.aio.Metadata(*md), details.credentials,
                                       details.wait_for_ready)


def _serialize(message) -> bytes:
    return message.SerializeToString() if message is not None else b""


async def _peek(request_iterator) -> tuple[object, AsyncIterator]:
    """The first message of a request stream (sync or async) and a stream that yields it again first."""
    if hasattr(request_iterator, "__aiter__"):
        it = request_iterator.__aiter__()
        try:
            first = await it.__anext__()
        except StopAsyncIteration:
            first = None
    else:
        it = iter(request_iterator)
        first = next(it, None)

    async def again():
        if first is None:
            return
        yield first
        if hasattr(it, "__anext__"):
            async for m in it:
                yield m
        else:
            for m in it:
                yield m

    return first, again()


class _UnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, signer: Signer):
        self.signer = signer

    async def intercept_unary_unary(self, continuation, details, request):
        details = self.signer.details(details, _serialize(request))
        call = await continuation(details, request)
        self.signer.watch(call)
        if not self.signer.reply_key:
            return call
        reply = await call   # a private run: the reply is used only once its MAC checks out
        nonce = next((v for k, v in details.metadata or () if k == NONCE), "")
        check_reply(self.signer.reply_key, method_name(details), nonce, reply, await call.trailing_metadata())
        return reply


class _UnaryStream(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, signer: Signer):
        self.signer = signer

    async def intercept_unary_stream(self, continuation, details, request):
        call = await continuation(self.signer.details(details, _serialize(request)), request)
        self.signer.watch(call)
        return call


class _StreamUnary(grpc.aio.StreamUnaryClientInterceptor):
    def __init__(self, signer: Signer):
        self.signer = signer

    async def intercept_stream_unary(self, continuation, details, request_iterator):
        first, stream = await _peek(request_iterator)
        call = await continuation(self.signer.details(details, _serialize(first)), stream)
        self.signer.watch(call)
        return call


def client_interceptors(signer: Signer) -> list:
    return [_UnaryUnary(signer), _UnaryStream(signer), _StreamUnary(signer)]
