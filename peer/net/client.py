"""gRPC channels to other peers (one cached aio channel per address, bounded message sizes)
and the errors of calls both ways. Runs on the network loop."""

from __future__ import annotations

import asyncio

import grpc

from peer._proto import peer_pb2 as pb
from peer._proto import peer_pb2_grpc
from peer.net import wire
from peer.net.signer import Signer, client_interceptors
from peer.tlsfiles import SERVER_NAME, TlsFiles

SERVICE = pb.DESCRIPTOR.services_by_name["Peer"].full_name

# 1 MiB chunks: large enough that per-message overhead (a protobuf object, an HTTP/2 frame
# header per 16 KiB, one await) is well under 1 % of the bytes, small enough that a member
# holds only one chunk's copy beyond the payload and a stalled stream is noticed within a chunk.
CHUNK_BYTES = 1 << 20
# One chunk plus its header (a ShardHeader lists at most the roster's contributors and
# weights), nothing larger: a peer never allocates a message bigger than this for anyone.
MAX_MESSAGE_BYTES = CHUNK_BYTES + (64 << 10)
CHANNEL_OPTIONS = [
    # Both directions, on channels and on the server alike (server.py passes these too).
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # HTTP/2 flow control: BDP probing (on by default in grpcio, set here so it stays on)
    # grows each stream's window to the link's bandwidth-delay product, so one stream fills
    # a long fat link; the windows themselves are not fixed by hand, since grpcio exposes no
    # per-stream window option other than the probe.
    ("grpc.http2.bdp_probe", 1),
    # Keepalive: a ping after 10 s without traffic, a dead peer noticed 20 s later, also between
    # calls so a cached channel to a dead peer fails. gRPC also sets TCP_USER_TIMEOUT to this
    # timeout (gRFC A18): sent bytes unacknowledged that long (or a zero window) close the
    # connection. At 5 s a peer on a 25 Mbit/s link among 100 Mbit/s ones lost its parts to
    # "recvmsg: Connection timed out" (bench/allreduce.py --slow-peer); 20 s is gRPC's default.
    # A dead peer mid-transfer is still dropped by the transfer's own deadline.
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),  # servers accept our keepalive pings
    ("grpc.http2.max_ping_strikes", 0),
    # No transparent retries: a failed call is a fact for the round (unreachable, backup owner).
    ("grpc.enable_retries", 0),
]


def open_channel(address: str, signer: Signer, options=CHANNEL_OPTIONS, tls: TlsFiles | None = None
                 ) -> grpc.aio.Channel:
    """A channel whose every call is signed by `signer` (peer.net.auth); with `tls`, over TLS with this
    peer's certificate, trusting the run's CA alone and checking the name every peer certificate
    carries (peer.tlsfiles.SERVER_NAME: peers are dialled by address, which no certificate names)."""
    interceptors = client_interceptors(signer)
    if tls is None:
        return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)
    credentials = grpc.ssl_channel_credentials(tls.ca_pem, tls.key_pem, tls.cert_pem)
    return grpc.aio.secure_channel(address, credentials, options=[*options, ("grpc.ssl_target_name_override",
                                                                             SERVER_NAME)], interceptors=interceptors)


def server_credentials(tls: TlsFiles) -> grpc.ServerCredentials:
    """A TLS server's: our certificate, and only clients with a certificate the run's CA issued."""
    return grpc.ssl_server_credentials([(tls.key_pem, tls.cert_pem)], root_certificates=tls.ca_pem,
                                       require_client_auth=True)


class PeerStub(peer_pb2_grpc.PeerStub):
    """The generated stub, but the shard streams' bulk bytes go through peer.net.wire (ShardChunk
    messages on the wire all the same, with fewer copies of their data)."""

    def __init__(self, channel: grpc.aio.Channel):
        super().__init__(channel)
        self.Contribute = channel.stream_unary(
            f"/{SERVICE}/Contribute", request_serializer=wire.serialize,
            response_deserializer=pb.ContributeReply.FromString, _registered_method=True)
        self.GetShard = channel.unary_stream(
            f"/{SERVICE}/GetShard", request_serializer=pb.ShardRequest.SerializeToString,
            response_deserializer=wire.parse_chunk, _registered_method=True)


class Channels:
    """Caches one channel per address, each signing its calls with `signer` (over TLS with `tls`);
    `close()` closes them all."""

    def __init__(self, signer: Signer, tls: TlsFiles | None = None) -> None:
        self.signer, self.tls = signer, tls
        self._channels: dict[str, grpc.aio.Channel] = {}

    def stub(self, address: str) -> PeerStub:
        ch = self._channels.get(address)
        if ch is None:
            ch = open_channel(address, self.signer, tls=self.tls)
            self._channels[address] = ch
        return PeerStub(ch)

    async def drop(self, address: str) -> None:
        ch = self._channels.pop(address, None)
        if ch is not None:
            await ch.close(grace=None)

    async def close(self) -> None:
        for address in list(self._channels):
            await self.drop(address)


class Reject(Exception):
    """Raised by a handler to end the call with `code` and a message naming the cause."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


class EndedEarly(Exception):
    """A client-streaming call the callee ended while we were still sending, reported by grpc.aio as a
    local cancel (see `sent`): its status, and with it the callee's reason, is lost."""


async def sent(call):
    """Awaits a client-streaming call (Contribute). grpc.aio has a race: when the callee ends the call
    (refuses it) while we still write, it may cancel the call locally (`_StreamRequestMixin._write`)
    and raise CancelledError here instead of the callee's status. A CancelledError while our own task
    is not being cancelled is that: EndedEarly. (Python 3.10 has no `Task.cancelling`: re-raised.)"""
    try:
        return await call
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is None or getattr(task, "cancelling", lambda: 1)():
            raise
        raise EndedEarly("the callee ended the call while we were still sending (no reason reached us)") from None


def describe_rpc_error(e: grpc.aio.AioRpcError) -> str:
    details = (e.details() or "").splitlines()[0][:200] if e.details() else ""
    return f"{e.code().name}: {details}" if details else e.code().name
