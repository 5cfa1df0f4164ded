"""Butterfly all-reduce for one round: an owner's shard (collect whole, checked contributions,
reduce in sorted member order, encode once) and a member's part (send shards, pull results,
verify). Runs on the network loop; encode/decode of large tensors goes to an executor."""

from __future__ import annotations

import asyncio
import logging
import warnings
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import blake3
import grpc
import numpy as np
import torch

from peer._proto import peer_pb2 as pb
from peer.aggregate import Aggregator, weighted_mean
from peer.codecs import Codec
from peer.feedback import ErrorFeedback, ResidualUpdate
from peer.net import wire
from peer.net.chunkmac import OFF, StreamMac
from peer.net.client import CHUNK_BYTES

log = logging.getLogger(__name__)


def payload_digest(data: bytes | bytearray | memoryview) -> str:
    """The hex digest a shard header carries for its payload (the proto's `sha256` fields keep their
    name): BLAKE3-256, a cryptographic hash (collision resistance 2^128, like SHA-256's) that runs
    about 2.6 x faster than SHA-NI SHA-256 on one core; every payload is hashed by its sender and its
    receiver, so this is per-byte cost on both ends (ARCHITECTURE.md section 8)."""
    return blake3.blake3(data).hexdigest()


def chunks(header: pb.ShardHeader, payload: bytes | bytearray | memoryview, mac: StreamMac = OFF
           ) -> Iterator[wire.OutChunk]:
    """The stream for one payload, made lazily (each chunk a view of the payload, copied once when
    gRPC serializes it, never the whole payload again): the header alone first, so a call's
    signature (over its first message, peer.net.auth) covers the header and with it the payload's
    digest, at the cost of hashing a few hundred bytes, not a chunk of data; `mac` seals each chunk
    (a private run without TLS: peer.net.chunkmac), the header-only one as chunk 0."""
    view = memoryview(payload).cast("B")
    yield mac.seal(0, wire.OutChunk(pb.ShardChunk(header=header), b""))
    for n, i in enumerate(range(0, len(view), CHUNK_BYTES), 1):
        yield mac.seal(n, wire.OutChunk(pb.ShardChunk(), view[i:i + CHUNK_BYTES]))


async def rest_of(call) -> AsyncIterator[pb.ShardChunk]:
    """The remaining messages of a client-side streaming call read with `read()`."""
    while True:
        chunk = await call.read()
        if chunk is grpc.aio.EOF:
            return
        yield chunk


async def read_payload(first: pb.ShardChunk, rest: AsyncIterator[pb.ShardChunk], expected_bytes: int,
                       mac: StreamMac = OFF, into: memoryview | None = None) -> bytearray | memoryview:
    """Takes a stream's chunks as they arrive into one buffer of the announced size (the
    caller checked `expected_bytes` against the codec's size for the shard, and `first`'s MAC
    before it read the header), hashing each chunk on arrival (payload_digest); refuses a later
    chunk whose MAC is not `mac`'s (chunk 1, 2, ...), more or fewer bytes, and a digest other than
    the header's. `into`: a writable buffer of exactly `expected_bytes` to fill instead of a new one
    (the payload is then a read-only view of it)."""
    if into is not None and into.nbytes != expected_bytes:
        raise ValueError(f"a buffer of {into.nbytes} bytes cannot take a payload of {expected_bytes}")
    buf = bytearray(expected_bytes) if into is None else into.cast("B")
    view = memoryview(buf)
    digest = blake3.blake3()
    filled = 0

    def take(data: bytes) -> None:
        nonlocal filled
        if filled + len(data) > expected_bytes:
            raise ValueError(f"stream carries more than the {expected_bytes} bytes announced")
        view[filled:filled + len(data)] = data
        digest.update(data)
        filled += len(data)

    take(first.data)
    index = 0
    async for chunk in rest:
        index += 1
        mac.check(index, chunk)
        take(chunk.data)
    if filled != expected_bytes:
        raise ValueError(f"stream ended after {filled} of {expected_bytes} bytes")
    if digest.hexdigest() != first.header.sha256:
        raise ValueError("payload digest does not match its header")
    return buf if into is None else view.toreadonly()


def byte_view(values: torch.Tensor) -> memoryview:
    """The bytes of a contiguous float32 CPU tensor, writable, as little-endian fp32 payloads are laid out."""
    return memoryview(values.numpy()).cast("B")


def holds(payload: bytes | bytearray | memoryview, values: torch.Tensor) -> bool:
    """Whether `payload` is `values`' own memory (read_payload filled it in place)."""
    if not isinstance(payload, memoryview) or payload.nbytes != 4 * values.numel() or not values.numel():
        return False
    return np.frombuffer(payload, dtype=np.uint8).ctypes.data == values.data_ptr()


def check_header(h: pb.ShardHeader, roster: pb.Roster, codec: Codec, reduced: bool) -> str | None:
    """Why a shard header does not fit the roster, or None when it does."""
    if h.round != roster.round or h.roster_hash != roster.hash:
        return f"header is for round {h.round} roster {h.roster_hash[:8]}, expected {roster.round} {roster.hash[:8]}"
    if not 0 <= h.shard < len(roster.owners):
        return f"shard {h.shard} does not exist ({len(roster.owners)} shards)"
    numel = roster.shard_bounds[h.shard + 1] - roster.shard_bounds[h.shard]
    if h.codec != roster.codec or h.numel != numel:
        return f"shard {h.shard} has {h.numel} values in {h.codec}, expected {numel} in {roster.codec}"
    if h.num_bytes != codec.encoded_size(numel):
        return f"shard {h.shard} announces {h.num_bytes} bytes, expected {codec.encoded_size(numel)}"
    members = {m.peer_id for m in roster.members}
    if not reduced and h.sender not in members:
        return f"sender {h.sender[-6:]} is not in the roster"
    if reduced and (not h.contributors or set(h.contributors) - members or len(h.weights) != len(h.contributors)):
        return f"shard {h.shard} lists contributors outside the roster"
    return None


@dataclass
class OwnedShard:
    """One shard this peer owns in one round: accepted contributions, then the reduced result."""

    roster: pb.Roster
    index: int
    codec: Codec
    received: dict[str, torch.Tensor] = field(default_factory=dict)
    parts: dict[str, str] = field(default_factory=dict)   # sender -> payload_digest of its part
    result: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    all_in: asyncio.Event = field(default_factory=asyncio.Event)
    pending_residual: ResidualUpdate | None = None   # applied if the round commits
    task: asyncio.Future | None = None      # the reduction, referenced so it cannot be collected
    served: set[str] = field(default_factory=set)  # members that fetched the result
    absent: str = ""   # a backup reduction expects no contribution from the dead owner
    refused: dict[str, str] = field(default_factory=dict)   # sender -> why its contribution was dropped
    aggregate: Aggregator | None = None   # the run's spec.aggregator (owner.aggregator_of); None: the mean
    lie: float = 1.0   # a test fault plan's lying owner serves lie x the result (faults.owner_factor)
    closed: bool = False   # the reduction began: no part is taken any more (received is cleared after it)

    def pending_fetches(self, reducer: str = "") -> set[str]:
        """Members that have not fetched the result yet (empty when reducing failed); `reducer`: who
        reduced it, when not the shard's owner (a backup's reduction is fetched by the owner too)."""
        if self.result.done() and self.result.exception() is not None:
            return set()
        members = {m.peer_id for m in self.roster.members}
        return members - self.served - {reducer or self.roster.owners[self.index]}

    @property
    def bounds(self) -> tuple[int, int]:
        return self.roster.shard_bounds[self.index], self.roster.shard_bounds[self.index + 1]

    def add(self, sender: str, values: torch.Tensor, sha: str = "") -> None:
        self.received[sender] = values
        self.parts[sender] = sha
        self._check_all_in()

    def refuse(self, sender: str, why: str) -> None:
        """Drops `sender`'s contribution for good (validation refused it): the shard waits no longer for it."""
        self.refused[sender] = why
        self._check_all_in()

    def _check_all_in(self) -> None:
        if {m.peer_id for m in self.roster.members} - {self.absent} - set(self.refused) <= set(self.received):
            self.all_in.set()

    async def reduce_at(self, timeout_s: float, ef: ErrorFeedback, loop_executor=None) -> None:
        """Waits for every member (or the deadline), then reduces and encodes the shard once."""
        try:
            await asyncio.wait_for(self.all_in.wait(), timeout_s)
        except asyncio.TimeoutError:
            pass
        self.closed = True
        weights = {m.peer_id: m.weight for m in self.roster.members}
        contributors = sorted(self.received)
        missing = sorted(set(weights) - set(contributors) - {self.absent})
        if missing:
            log.warning("round %d: shard %d reduced without %s (no whole contribution within %.1f s)",
                        self.roster.round, self.index, ", ".join(p[-6:] for p in missing), timeout_s)
        if not contributors:
            self.result.set_exception(RuntimeError(f"shard {self.index}: no contribution arrived"))
            return
        items = [(weights[p], self.received[p]) for p in contributors]
        loop = asyncio.get_running_loop()
        payload, pending = await loop.run_in_executor(loop_executor, self._reduce_encode, items, ef)
        self.pending_residual = pending
        header = pb.ShardHeader(round=self.roster.round, roster_hash=self.roster.hash, shard=self.index,
                                codec=self.codec.name, numel=self.bounds[1] - self.bounds[0],
                                num_bytes=len(payload), sha256=payload_digest(payload), contributors=contributors,
                                weights=[w for w, _ in items], total_weight=sum(w for w, _ in items),
                                backup=bool(self.absent), parts_sha256=[self.parts[p] for p in contributors])
        self.received.clear()
        self.result.set_result((header, payload))

    def _reduce_encode(self, items: list[tuple[float, torch.Tensor]], ef: ErrorFeedback
                       ) -> tuple[bytes, ResidualUpdate]:
        """The aggregate (the mean, or a robust one) plus the owner's residual on this shard's slice, encoded once."""
        start, numel = self.bounds[0], self.roster.numel
        mean = (self.aggregate or weighted_mean)(items)
        if self.lie != 1.0:
            mean = mean * self.lie
        target = mean if self.codec.EXACT else ef.compensate(start, mean, numel)
        payload, decoded = self.codec.encode_decoded(target)   # fp32: the mean's own bytes (nothing else holds it)
        return payload, ResidualUpdate(start, numel, target, decoded, owner_round=self.roster.round)


@dataclass
class ShardResult:
    header: pb.ShardHeader
    payload: bytes
    values: torch.Tensor


def encode_shards(delta: torch.Tensor, roster: pb.Roster, codec: Codec, ef: ErrorFeedback
                  ) -> list[tuple[bytes, ResidualUpdate]]:
    """Encodes every shard of a member's delta with its slice of the flat residual added.
    Returns (payload, pending residual update) per shard; runs in an executor."""
    if delta.numel() != roster.numel:
        raise ValueError(f"round {roster.round}: the delta has {delta.numel()} values, the roster {roster.numel}")
    return [encode_shard(delta, roster, codec, ef, j) for j in range(len(roster.owners))]


def encode_shard(delta: torch.Tensor, roster: pb.Roster, codec: Codec, ef: ErrorFeedback, j: int
                 ) -> tuple[bytes, ResidualUpdate]:
    """Shard j of a member's delta with its slice of the flat residual added, encoded: the
    payload and its pending residual update. Runs in an executor, one shard at a time, so
    the member sends shard j while it encodes the next."""
    if delta.numel() != roster.numel:
        raise ValueError(f"round {roster.round}: the delta has {delta.numel()} values, the roster {roster.numel}")
    b = roster.shard_bounds
    # an exact codec leaves no residual: the slice itself is sent (error feedback has nothing to add)
    target = delta[b[j]:b[j + 1]] if codec.EXACT else ef.compensate(b[j], delta[b[j]:b[j + 1]], roster.numel)
    # fp32: a view of the delta's slice (a hand-over: nobody changes it), and target itself as its
    # decoding (it loses nothing); a lossy codec's decoding is made here, not at commit on the loop
    payload, decoded = codec.encode_decoded(target)
    return payload, ResidualUpdate(b[j], roster.numel, target, decoded)


def local_values(codec: Codec, payload: bytes | memoryview, numel: int) -> torch.Tensor:
    """Our own part of a shard as the owner takes it: decoded, or for fp32 (whose payload is a view of
    our delta, encode_view) the same memory, read only like every contribution."""
    if codec.EXACT and isinstance(payload, memoryview) and numel:
        with warnings.catch_warnings():   # read-only memory: the reductions only read their inputs
            warnings.simplefilter("ignore", UserWarning)
            return torch.frombuffer(payload.cast("B"), dtype=torch.float32)
    return codec.decode(payload, numel)


def contribution_header(roster: pb.Roster, sender: str, shard: int, codec: Codec, payload: bytes,
                        backup: bool = False) -> pb.ShardHeader:
    numel = roster.shard_bounds[shard + 1] - roster.shard_bounds[shard]
    return pb.ShardHeader(round=roster.round, roster_hash=roster.hash, sender=sender, shard=shard,
                          codec=codec.name, numel=numel, num_bytes=len(payload), sha256=payload_digest(payload),
                          backup=backup)


def backup_owner(roster: pb.Roster, shard: int) -> str:
    """Who reduces shard `shard` again when its owner dies: the owner of the next shard owned by
    another peer, cyclically (an owner's pieces are next to each other: peer.net.shardmap.pieces); ""
    when the roster has a single owner."""
    n, owner = len(roster.owners), roster.owners[shard]
    return next((roster.owners[(shard + i) % n] for i in range(1, n) if roster.owners[(shard + i) % n] != owner), "")


def piece_index(roster: pb.Roster, shard: int) -> int:
    """Which of its owner's pieces shard `shard` is: 0 for the first (peer.net.shardmap.pieces)."""
    owner, i = roster.owners[shard], 0
    while shard - i > 0 and roster.owners[shard - i - 1] == owner:
        i += 1
    return i


def apply_residuals(ef: ErrorFeedback, codec: Codec, pending: list[ResidualUpdate]) -> None:
    """Commits error-feedback updates of an applied round: on each update's slice, residual = what we
    meant to send - what was received (an owner's updates also zero the rest, see ErrorFeedback).
    An exact codec loses nothing: its residuals stay as they are (none, or zeros)."""
    if codec.EXACT:
        return
    for u in pending:
        decoded = codec.decode(u.encoded, u.target.numel()) if isinstance(u.encoded, bytes) else u.encoded
        if u.owner_round is None:
            ef.update(u.start, u.target, decoded, u.numel)
        else:
            ef.update_owned(u.owner_round, u.start, u.target, decoded, u.numel)
