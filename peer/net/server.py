"""The gRPC server of a peer: a thin servicer that hands every call to the core, and the one
place that maps failures to status codes. Runs on the network loop."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import grpc

from peer._proto import peer_pb2 as pb
from peer._proto import peer_pb2_grpc
from peer.net import auth, group, owner, validate, wire
from peer.net.auth import AuthInterceptor
from peer.net.client import CHANNEL_OPTIONS, SERVICE, Reject, server_credentials
from peer.net.linktest import LinkTests
from peer.net.upload import paced

if TYPE_CHECKING:
    from peer.net.core import NetCore

log = logging.getLogger(__name__)


class Servicer(peer_pb2_grpc.PeerServicer):
    def __init__(self, core: NetCore):
        self.core = core
        self.link_tests = LinkTests()

    async def _guard(self, context: grpc.aio.ServicerContext, what: str, coro, request=None):
        """Runs a handler's coroutine, mapping its failures to status codes; `request` is checked
        first (peer.net.validate: its numbers in range, and it speaks only for its signed caller)."""
        try:
            if request is not None:
                try:
                    validate.request(request, auth.caller().peer_id)
                except Reject:
                    coro.close()   # the handler never runs (no "coroutine was never awaited" warning)
                    raise
            return await coro
        except Reject as e:
            log.debug("%s rejected: %s", what, _short(str(e)))
            await context.abort(e.code, _short(str(e)))
        except TimeoutError as e:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, _short(f"{what}: {e}"))
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _short(f"{what}: {e}"))

    async def Join(self, request: pb.JoinRequest, context):
        return await self._guard(context, "Join", group.handle_join(self.core, request), request)

    async def Contribute(self, request_iterator, context):
        return await self._guard(context, "Contribute", owner.handle_contribute(self.core, _signed_stream(
            request_iterator, auth.caller().peer_id)))

    async def GetShard(self, request: pb.ShardRequest, context):
        chunks = await self._guard(context, "GetShard", owner.handle_get_shard(self.core, request), request)
        async for chunk in paced(self.core.upload, chunks or ()):
            await context.write(chunk)
        self.core.faults.hit("served_shard", request.round)

    async def Commit(self, request: pb.CommitRequest, context):
        return await self._guard(context, "Commit", group.handle_commit(self.core, request), request)

    async def GetState(self, request: pb.StateRequest, context):
        snapshot = await self._guard(context, "GetState", self.core.held.serve(request), request)
        if snapshot is None:
            return
        mac = self.core.signer.macs.state(snapshot.header.sha256, self.core.peer_id[-6:])
        chunks = paced(self.core.upload, snapshot.chunks(request.offset, request.length, mac))
        chunk = await anext(chunks)
        async for following in chunks:
            await context.write(chunk)
            chunk = following
        if chunk.data:  # a test kills a donor here: the newcomer never gets all of the range, whatever its size
            self.core.faults.hit("serving_state", snapshot.header.round)
        await context.write(chunk)

    async def GetUpdates(self, request: pb.UpdatesRequest, context):
        chunks = await self._guard(context, "GetUpdates", self.core.handle_get_updates(request), request)
        async for chunk in paced(self.core.upload, chunks or ()):
            await context.write(chunk)

    async def Progress(self, request: pb.ProgressRequest, context):
        async def answer() -> pb.ProgressReply:
            return self.core.handle_progress(request)

        return await self._guard(context, "Progress", answer(), request)

    async def Health(self, request: pb.HealthRequest, context):
        return self.core.health()

    async def DialBack(self, request: pb.DialBackRequest, context):
        return await self._guard(context, "DialBack", self.core.dialer.handle(request, context.peer()), request)

    async def LinkTest(self, request_iterator, context):
        return await self._guard(context, "LinkTest", self.link_tests.handle(request_iterator))


MAX_DETAILS = 1000   # characters of a refusal's text: gRPC drops a status whose metadata passes 16 KiB


def _short(details: str) -> str:
    """A refusal's text, cut to MAX_DETAILS (it may quote what the caller sent)."""
    return details if len(details) <= MAX_DETAILS else f"{details[:MAX_DETAILS]}... ({len(details)} characters)"


async def _signed_stream(chunks, caller_id: str):
    """A contribution stream whose header (its first chunk) must be there, with its numbers in range,
    and name the signed caller as its sender."""
    first = True
    async for chunk in chunks:
        if first:
            if not chunk.HasField("header"):
                raise Reject(grpc.StatusCode.INVALID_ARGUMENT, "the first chunk of a Contribute stream carries no header")
            validate.request(chunk.header, caller_id)
        first = False
        yield chunk


_HANDLERS = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
             (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}


def add_servicer(server: grpc.aio.Server, servicer: peer_pb2_grpc.PeerServicer) -> None:
    """peer_pb2_grpc.add_PeerServicer_to_server, every method from the proto's service, except that
    the shard streams' bulk bytes go through peer.net.wire (Contribute's chunks in, GetShard's out)."""
    handlers = {}
    for m in pb.DESCRIPTOR.services_by_name["Peer"].methods:
        request, response = getattr(pb, m.input_type.name), getattr(pb, m.output_type.name)
        handlers[m.name] = _HANDLERS[m.client_streaming, m.server_streaming](
            getattr(servicer, m.name),
            request_deserializer=wire.parse_chunk if m.name == "Contribute" else request.FromString,
            response_serializer=wire.serialize if m.name == "GetShard" else response.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)


async def start_server(core: NetCore, host: str, port: int, servicer: Servicer | None = None
                       ) -> tuple[grpc.aio.Server, int]:
    """Starts the server on host:port (0 = a free port) and returns it with the bound port;
    `servicer` (a test's subclass) defaults to Servicer(core)."""
    # The same options as our channels (client.py explains each): message sizes bounded to
    # one chunk, BDP-probed flow-control windows, and the keepalive pings our channels send accepted.
    # Every call is checked (peer.net.auth) before its handler runs.
    server = grpc.aio.server(options=CHANNEL_OPTIONS, interceptors=[AuthInterceptor(core.verifier, core.limits)])
    add_servicer(server, servicer or Servicer(core))
    bound = (server.add_secure_port(f"{host}:{port}", server_credentials(core.tls)) if core.tls is not None
             else server.add_insecure_port(f"{host}:{port}"))
    if bound == 0:
        raise OSError(f"cannot listen for gRPC on {host}:{port} (in use or not an address of this machine)")
    await server.start()
    return server, bound
