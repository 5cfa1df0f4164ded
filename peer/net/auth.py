"""Who is calling: every gRPC call carries, in its metadata, the caller's peer id and public key, a
timestamp, a nonce and a signature (the caller's key) over the method, the timestamp, the nonce and
the sha256 of the call's first request message (the whole request of a unary call: its round, roster
hash and every claim in it). In a private run (`--run-secret`) it also carries a proof of the secret:
an HMAC under it over the same text. The client side is a set of gRPC client interceptors on every
channel (`client.Channels`, made in signer.py); the server side is one server interceptor (`AuthInterceptor`) that checks
all of it before any handler runs and refuses with UNAUTHENTICATED, naming the cause; a handler learns
its caller from `caller()`, never from a field the caller filled in.

Refused: no or malformed metadata, a key whose hash is not the claimed id, a bad signature, a
timestamp further than --max-clock-skew-s from ours, a nonce seen before (a replay), a missing or
wrong secret proof. Each refusal is logged once per caller and cause at WARNING (then at DEBUG)."""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import hmac
import inspect
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError
from hivemind.utils import get_dht_time

from peer.identity import peer_id_of, verify
from peer.net.chunkmac import REPLY_MAC, reply_mac
from peer.net.limits import CallerLimits, host_of

log = logging.getLogger(__name__)

ID, KEY, TS, NONCE, SIG, PROOF = ("x-diloco-id", "x-diloco-key", "x-diloco-ts", "x-diloco-nonce", "x-diloco-sig",
                                  "x-diloco-proof")
MAX_NONCES = 200_000          # replay memory; calls are refused (RESOURCE_EXHAUSTED) rather than forgotten early
MAX_FIELD = 1024              # bytes of any one auth metadata value (a 2048-bit key in OpenSSH form is ~380)
SECRET_REFUSED = "the run secret does not match"   # what a peer with the wrong secret is told
SECRET_MISSING = "this run is private: the call carries no run secret"


class AuthRefused(Exception):
    """A peer refused our calls for the run secret: this peer stops with exit status 3."""


@dataclass(frozen=True)
class Caller:
    peer_id: str
    host: str        # the address the call came from, as the transport saw it ("ipv4:1.2.3.4:5678")


_CALLER: contextvars.ContextVar[Caller | None] = contextvars.ContextVar("diloco_caller", default=None)


def caller() -> Caller:
    """The authenticated caller of the call being handled (set by AuthInterceptor)."""
    c = _CALLER.get()
    if c is None:
        raise RuntimeError("no authenticated caller: the handler runs outside AuthInterceptor")
    return c


def secret_key(secret: str) -> bytes:
    """The HMAC key derived from a run secret (the secret itself never leaves this process)."""
    return hashlib.sha256(b"diloco-run-secret\n" + secret.encode()).digest() if secret else b""


def derived_key(secret: str, purpose: str) -> bytes:
    """A key for one use of the run secret (`chunk-mac`, `member`), independent of the calls' proof key."""
    return hmac.new(secret_key(secret), f"diloco-{purpose}".encode(), hashlib.sha256).digest() if secret else b""


def signed_text(method: str, ts: str, nonce: str, body_sha256: str) -> bytes:
    return f"diloco-call\n{method}\n{ts}\n{nonce}\n{body_sha256}".encode()


def method_name(details) -> str:
    m = details.method
    return m.decode() if isinstance(m, bytes) else m


class Refusal(Exception):
    def __init__(self, code: grpc.StatusCode, why: str):
        super().__init__(why)
        self.code = code


class Verifier:
    """Checks a call's auth metadata; remembers nonces for twice the skew bound (replays). In a private
    run without TLS (`seal`) it also seals unary replies (`reply_key`, see AuthInterceptor)."""

    def __init__(self, secret: str = "", max_skew_s: float = 30.0, clock: Callable[[], float] = get_dht_time,
                 seal: bool = True):
        self.key, self.max_skew_s, self.clock = secret_key(secret), max_skew_s, clock
        self.reply_key = derived_key(secret, "reply-mac") if seal else b""
        self._nonces: OrderedDict[str, float] = OrderedDict()   # nonce -> when it may be forgotten (monotonic)
        self._logged: set[tuple[str, str]] = set()
        self.refused = 0

    def check(self, method: str, metadata, body_sha256: str) -> str:
        """The caller's peer id, or Refusal."""
        md = {}
        for k, v in metadata or ():
            if k in (ID, KEY, TS, NONCE, SIG, PROOF):
                if k in md or len(v) > MAX_FIELD:
                    raise Refusal(grpc.StatusCode.UNAUTHENTICATED, f"malformed auth metadata {k}")
                md[k] = v if isinstance(v, str) else v.decode("latin-1")
        missing = [k for k in (ID, KEY, TS, NONCE, SIG) if k not in md]
        if missing:
            raise Refusal(grpc.StatusCode.UNAUTHENTICATED, f"unsigned call (no {', '.join(missing)}): "
                          "every call must be signed by the caller's peer key")
        text = signed_text(method, md[TS], md[NONCE], body_sha256)
        if self.key:  # a private run: the secret before anything that costs
            if PROOF not in md:
                raise Refusal(grpc.StatusCode.UNAUTHENTICATED, SECRET_MISSING)
            if not hmac.compare_digest(md[PROOF], hmac.new(self.key, text, hashlib.sha256).hexdigest()):
                raise Refusal(grpc.StatusCode.UNAUTHENTICATED, SECRET_REFUSED)
        try:
            ts = float(md[TS])
        except ValueError:
            raise Refusal(grpc.StatusCode.UNAUTHENTICATED, f"malformed timestamp {md[TS][:20]!r}") from None
        skew = ts - self.clock()
        if not abs(skew) <= self.max_skew_s:
            raise Refusal(grpc.StatusCode.UNAUTHENTICATED,
                          f"the call is stamped {skew:+.1f} s from this peer's clock (the bound is "
                          f"{self.max_skew_s:g} s): fix the clock (NTP), or it is a replay")
        try:
            claimed_by = peer_id_of(md[KEY].encode())
        except ValueError as e:
            raise Refusal(grpc.StatusCode.UNAUTHENTICATED, f"bad public key: {e}") from None
        if claimed_by != md[ID]:
            raise Refusal(grpc.StatusCode.UNAUTHENTICATED,
                          f"the key belongs to {claimed_by[-6:]}, not to the claimed peer {md[ID][-6:]}")
        if not verify(md[KEY].encode(), text, md[SIG].encode()):
            raise Refusal(grpc.StatusCode.UNAUTHENTICATED, f"bad signature from {md[ID][-6:]}")
        self._remember(md[NONCE])
        return md[ID]

    def _remember(self, nonce: str) -> None:
        now = time.monotonic()
        while self._nonces and next(iter(self._nonces.values())) < now:
            self._nonces.popitem(last=False)
        if nonce in self._nonces:
            raise Refusal(grpc.StatusCode.UNAUTHENTICATED, "replayed call (its nonce was used before)")
        if len(self._nonces) >= MAX_NONCES:
            raise Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many calls to remember: try again shortly")
        self._nonces[nonce] = now + 2 * self.max_skew_s

    def log_refusal(self, who: str, host: str, method: str, why: str) -> None:
        self.refused += 1
        key = (host.rsplit(":", 1)[0], why.split(" (")[0][:60])
        if key in self._logged:
            log.debug("refused %s from %s (%s): %s", method, who or "?", host, why)
            return
        if len(self._logged) < 10_000:
            self._logged.add(key)
        log.warning("refused %s from %s at %s: %s (logged once per caller and cause)", method.rsplit("/", 1)[-1],
                    who[-6:] if who else "an unknown caller", host, why)


UNDECODABLE = object()   # a request message that is not a valid protobuf of its method's type


def _hashing(deserializer):
    """The message and its bytes (the signature covers them); UNDECODABLE for bytes that do not parse,
    which the interceptor refuses with INVALID_ARGUMENT (gRPC would answer UNKNOWN with a traceback)."""
    def deserialize(raw: bytes):
        try:
            return deserializer(raw), raw
        except DecodeError:
            return UNDECODABLE, raw

    return deserialize


async def _refuse_undecodable(context, method: str) -> None:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                        f"the request is not a valid {method.rsplit('/', 1)[-1]} message (it does not parse)")


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Checks every call before its handler runs: the caller host's limits (peer.net.limits), then
    its signature (Verifier), then the signed peer's limits; the handler sees plain messages and
    `caller()`. Refusals end the call with UNAUTHENTICATED or RESOURCE_EXHAUSTED, naming the cause."""

    def __init__(self, verifier: Verifier, limits: CallerLimits | None = None):
        self.verifier, self.limits = verifier, limits or CallerLimits()

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None:
            return None
        method, metadata = method_name(details), details.invocation_metadata
        limits, verifier = self.limits, self.verifier

        async def refuse(context, code, why: str) -> None:
            claimed = next((v for k, v in metadata or () if k == ID), "")
            verifier.log_refusal(claimed if isinstance(claimed, str) else "", context.peer(), method, why)
            await context.abort(code, why)

        @contextlib.asynccontextmanager
        async def host_admitted(context):
            host = host_of(context.peer())
            why = limits.enter_host(host)
            if why:
                await refuse(context, grpc.StatusCode.RESOURCE_EXHAUSTED, why)
            try:
                yield
            finally:
                limits.leave_host(host)

        @contextlib.asynccontextmanager
        async def peer_admitted(first_raw: bytes, context):
            try:
                who = verifier.check(method, metadata, hashlib.sha256(first_raw).hexdigest())
            except Refusal as e:
                await refuse(context, e.code, str(e))
            why = limits.enter_peer(who)
            if why:
                await refuse(context, grpc.StatusCode.RESOURCE_EXHAUSTED, why)
            _CALLER.set(Caller(who, context.peer()))
            try:
                yield
            finally:
                limits.leave_peer(who)

        if handler.unary_unary or handler.unary_stream:
            inner = handler.unary_unary or handler.unary_stream

            if inspect.isasyncgenfunction(inner):
                async def behavior(request, context):
                    message, raw = request
                    async with host_admitted(context), peer_admitted(raw, context):
                        if message is UNDECODABLE:
                            await _refuse_undecodable(context, method)
                        async for reply in inner(message, context):
                            yield reply
            else:
                async def behavior(request, context):
                    message, raw = request
                    async with host_admitted(context), peer_admitted(raw, context):
                        if message is UNDECODABLE:
                            await _refuse_undecodable(context, method)
                        reply = await inner(message, context)
                        if verifier.reply_key and handler.unary_unary:   # bound to the caller's nonce
                            nonce = next((v for k, v in metadata or () if k == NONCE), "")
                            context.set_trailing_metadata(((REPLY_MAC, reply_mac(verifier.reply_key, method, nonce,
                                                                                 reply)),))
                        return reply

            make = grpc.unary_unary_rpc_method_handler if handler.unary_unary else grpc.unary_stream_rpc_method_handler
            return make(behavior, request_deserializer=_hashing(handler.request_deserializer),
                        response_serializer=handler.response_serializer)
        if handler.stream_stream:
            raise TypeError("no stream-stream method is checked: add it to AuthInterceptor")
        inner = handler.stream_unary

        async def stream_behavior(request_iterator, context):
            async with host_admitted(context):
                it = request_iterator.__aiter__()
                try:
                    message, raw = await it.__anext__()
                except StopAsyncIteration:
                    message, raw = None, b""
                async with peer_admitted(raw, context):
                    async def messages():
                        if message is None:
                            return
                        yield message
                        async for m, _ in it:
                            if m is UNDECODABLE:
                                await _refuse_undecodable(context, method)
                            yield m

                    if message is UNDECODABLE:
                        await _refuse_undecodable(context, method)

                    return await inner(messages(), context)

        return grpc.stream_unary_rpc_method_handler(stream_behavior, request_deserializer=_hashing(
            handler.request_deserializer), response_serializer=handler.response_serializer)


def describe_secret_refusal(details: str) -> str | None:
    """The one line a peer prints before exit 3 when `details` (a refusal's text) is about the secret."""
    if SECRET_REFUSED in details:
        return "the run's peers refuse this peer's --run-secret: it is not the run's secret; use the run's secret"
    if SECRET_MISSING in details:
        return "this run is private: its peers refuse calls without the run secret; pass --run-secret-file, " \
               "DILOCO_RUN_SECRET or --run-secret"
    return None


__all__ = ["AuthInterceptor", "AuthRefused", "Caller", "Verifier", "caller", "describe_secret_refusal"]
