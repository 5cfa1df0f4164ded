"""Per-chunk MACs of a private run's streams: without TLS, every chunk of a Contribute, GetShard,
GetState or GetUpdates stream carries an HMAC-SHA256 (`mac`) under a key derived from the run
secret, over what the stream is (its kind, round, roster hash, shard, sender; a state's digest;
an update's round), the chunk's place in it (its index, or a state chunk's byte offset), the
header it carries (deterministic protobuf bytes) and its data. The receiver checks each chunk
before it uses any of it, so a man in the middle can neither change, reorder nor move a chunk
between streams, and a stream's unsigned header (a response's) cannot be rewritten either.

The unary replies (a Join's roster, a Commit's decision, ...) carry one in their trailing metadata
(REPLY_MAC: `reply_mac` over the method, the caller's nonce and the reply), set by the server's
AuthInterceptor and checked by the client's before the caller sees the reply (`check_reply`).

Off (a null `StreamMac`, no reply MAC) in a public run, and under TLS, which authenticates every byte.
Pure hashing: runs wherever a stream is made or read (the network loop), about as costly as the
sha256 that a shard stream is hashed with anyway."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

import grpc

from peer._proto import peer_pb2 as pb

REPLY_MAC = "x-diloco-reply-mac"   # trailing metadata of a private run's unary reply (without TLS)


class MacError(ValueError):
    """A chunk without its MAC, or with a wrong one: the stream is refused (the message says which)."""


@dataclass(frozen=True)
class StreamMac:
    """Seals or checks the chunks of one stream; `key` b"": off (seal adds nothing, check passes)."""

    key: bytes
    context: bytes   # what the stream is (ChunkMacs builds it)
    name: str        # how an error names the stream: "round 5: shard 2 from 9f3a1c"
    by_offset: bool = False   # chunks are placed by byte offset (a state range), not by index

    def tag(self, index: int, chunk) -> bytes:
        m = hmac.new(self.key, self.context + b"\n%d\n" % index, hashlib.sha256)
        header = chunk.header.SerializeToString(deterministic=True) if chunk.HasField("header") else b""
        m.update(b"%d\n" % len(header))
        m.update(header)
        m.update(chunk.data)
        return m.digest()

    def seal(self, index: int, chunk):
        """`chunk` with its MAC set (returned, for generators)."""
        if self.key:
            chunk.mac = self.tag(index, chunk)
        return chunk

    def check(self, index: int, chunk) -> None:
        """Raises MacError unless `chunk` carries the MAC of its place in this stream."""
        if not self.key:
            return
        if hmac.compare_digest(chunk.mac, self.tag(index, chunk)):
            return
        where = f"the chunk at byte {index}" if self.by_offset else f"chunk {index}"
        why = "carries no MAC" if not chunk.mac else "fails its MAC"
        raise MacError(f"{self.name}: {where} {why} (changed in flight, or sent by a peer without this private "
                       "run's secret): the stream is refused")


OFF = StreamMac(b"", b"", "")


def _context(*fields: object) -> bytes:
    return "\n".join(str(f) for f in fields).encode()


class ChunkMacs:
    """The streams of one peer: `key` derived from the run secret (peer.net.auth.derived_key),
    b"" in a public run or under TLS."""

    def __init__(self, key: bytes = b""):
        self.key = key

    def __bool__(self) -> bool:
        return bool(self.key)

    def _stream(self, name: str, *fields: object, by_offset: bool = False) -> StreamMac:
        return StreamMac(self.key, _context(*fields), name, by_offset) if self.key else OFF

    def contribution(self, h: pb.ShardHeader) -> StreamMac:
        """A member's part of a shard (Contribute), from the stream's first chunk's header."""
        to = "its backup owner" if h.backup else "its owner"
        return self._stream(f"round {h.round}: {h.sender[-6:]}'s part of shard {h.shard} to {to}",
                            "contribute", h.round, h.roster_hash, h.shard, int(h.backup), h.sender)

    def shard(self, req: pb.ShardRequest, source: str) -> StreamMac:
        """A reduced shard (GetShard's reply) that `source` serves for `req`."""
        what = "the backup reduction of shard" if req.backup else "shard"
        return self._stream(f"round {req.round}: {what} {req.shard} from {source[-6:]}", "shard", req.round,
                            req.roster_hash, req.shard, int(req.backup), int(req.header_only), source)

    def state(self, sha256: str, donor: str) -> StreamMac:
        """Byte ranges of the state named by its digest `sha256` (GetState's reply), served by `donor`."""
        return self._stream(f"state {sha256[:12]} from {donor}", "state", sha256, by_offset=True)

    def update(self, round_: int, donor: str) -> StreamMac:
        """One round's update in a GetUpdates reply (its chunks counted from its header's)."""
        return self._stream(f"the update of round {round_} from {donor}", "update", round_)

    def seal_updates(self, chunks: list[pb.UpdateChunk], me: str) -> list[pb.UpdateChunk]:
        """A GetUpdates reply sealed: each round's chunks counted from the one with its header."""
        mac, index = OFF, 0
        for chunk in chunks:
            if chunk.HasField("header"):
                mac, index = self.update(chunk.header.round, me), 0
            mac.seal(index, chunk)
            index += 1
        return chunks


def reply_mac(key: bytes, method: str, nonce: str, reply) -> str:
    """The MAC of a unary reply, bound to its call (the method and the caller's nonce): a reply can
    neither be changed nor moved to another call."""
    text = f"diloco-reply\n{method}\n{nonce}\n".encode() + reply.SerializeToString(deterministic=True)
    return hmac.new(key, text, hashlib.sha256).hexdigest()


def check_reply(key: bytes, method: str, nonce: str, reply, trailing) -> None:
    """Raises AioRpcError(DATA_LOSS) unless `reply` carries its MAC (`trailing`: the call's trailing
    metadata) for our call's `nonce`."""
    got = next((v for k, v in trailing or () if k == REPLY_MAC), "")
    if isinstance(got, str) and hmac.compare_digest(got, reply_mac(key, method, nonce, reply)):
        return
    why = "carries no MAC" if not got else "fails its MAC"
    raise grpc.aio.AioRpcError(grpc.StatusCode.DATA_LOSS, details=(
        f"the reply to {method.rsplit('/', 1)[-1]} {why} (changed in flight, or sent by a peer without this "
        "private run's secret): refused"))
