"""Global state over the wire: a snapshot the trainer hands over after each round, served in
chunks of byte ranges, and the download a newcomer makes from several donors at once (digest-
checked, never pickled). Runs on the network loop; hashing and unpacking go to an executor."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from dataclasses import dataclass

import grpc
import numpy as np
import torch

from peer._proto import peer_pb2 as pb
from peer.net.chunkmac import OFF, StreamMac
from peer.net.client import CHUNK_BYTES, Channels, Reject, describe_rpc_error
from peer.net.loop import Deadline
from peer.net.state_ranges import RANGE_BYTES, Donor, RangeFetch, merge
from peer.outer import GlobalState, digest

log = logging.getLogger(__name__)
PROBE_GRACE_S = 2.0   # after the first donor's header, the others have this long to send theirs
PIN_S = 20.0          # an older state asked for this recently is kept for the download using it


@dataclass(frozen=True)
class StateSnapshot:
    """One round's global state as bytes: theta then momentum, float32 little-endian. The bytes
    are the state's own tensors when they lie in one buffer in that order (outer_step makes
    them so; GlobalState tensors are never changed in place, so sharing them is safe), else one
    copy. The header's sha256 is the state's digest (outer.digest: BLAKE3 over round,
    global_samples and these bytes), hashed once per state, also by the downloader."""

    header: pb.StateHeader
    payload: memoryview

    @classmethod
    def of(cls, state: GlobalState, spec_hash: str) -> StateSnapshot:
        payload = _state_bytes(state.theta, state.momentum)
        header = pb.StateHeader(round=state.round, global_samples=state.global_samples,
                                numel=state.theta.numel(), num_bytes=len(payload),
                                sha256=state.digest(), digest=state.digest(), spec_hash=spec_hash)
        return cls(header, payload)

    def chunks(self, offset: int, length: int = 0, mac: StreamMac = OFF):
        """The bytes [offset, offset + length) (length 0: to the end), the header first; `mac`
        seals each chunk with its byte offset."""
        end = offset + length if length else len(self.payload)
        first = pb.StateChunk(header=self.header, data=bytes(self.payload[offset:min(end, offset + CHUNK_BYTES)]))
        yield mac.seal(offset, first)
        for i in range(offset + CHUNK_BYTES, end, CHUNK_BYTES):
            yield mac.seal(i, pb.StateChunk(data=bytes(self.payload[i:min(end, i + CHUNK_BYTES)])))


class HeldStates:
    """The states a donor serves (GetState): the current one and older ones that downloads begun
    on them still read: the one before, and those asked for in the last PIN_S seconds, at most
    `keep_rounds` back (a newcomer that gets one replays the rounds since from the update log,
    which keeps that many). On the network loop."""

    def __init__(self, keep_rounds: int) -> None:
        self.keep_rounds = keep_rounds
        self.current: StateSnapshot | None = None
        self.old: dict[str, tuple[StateSnapshot, float]] = {}  # sha256 -> (state, last asked for)
        self.asked = 0.0   # when a download last asked for the current state

    def put(self, snap: StateSnapshot | None) -> None:
        """Serves `snap` from now on (None: nothing, not even older states)."""
        now, old = time.monotonic(), self.current
        if snap is None:
            self.current, self.old = None, {}
            return
        kept = {sha: (s, t) for sha, (s, t) in self.old.items()
                if now - t < PIN_S and s.header.round >= snap.header.round - self.keep_rounds}
        if old is not None and old.header.sha256 != snap.header.sha256 and now - self.asked < PIN_S:
            kept[old.header.sha256] = (old, self.asked)
        self.current, self.old, self.asked = snap, kept, 0.0

    async def serve(self, req: pb.StateRequest) -> StateSnapshot:
        """The state a GetState asks for, its byte range checked; Reject says what is wrong."""
        snap = self.current
        if req.sha256 and snap is not None and snap.header.sha256 != req.sha256:
            if req.sha256 not in self.old:
                raise Reject(grpc.StatusCode.FAILED_PRECONDITION,
                             f"state {req.sha256[:12]} is not held here any more (serving round {snap.header.round})")
            snap = self.old[req.sha256][0]
            self.old[req.sha256] = (snap, time.monotonic())   # still in use: keep it a while
        elif snap is not None:
            self.asked = time.monotonic()
        if snap is None or snap.header.round < req.min_round:
            have = snap.header.round if snap else "none"
            raise Reject(grpc.StatusCode.FAILED_PRECONDITION, f"state of round {req.min_round} wanted, have {have}")
        size = len(snap.payload)
        if not 0 <= req.offset <= size:
            raise Reject(grpc.StatusCode.INVALID_ARGUMENT, f"offset {req.offset} is outside the state of {size} bytes")
        if not 0 <= req.length <= size - req.offset:
            raise Reject(grpc.StatusCode.INVALID_ARGUMENT, f"length {req.length} at offset {req.offset} is outside "
                                                           f"the state of {size} bytes (0 = to the end)")
        return snap


def _state_bytes(theta: torch.Tensor, momentum: torch.Tensor) -> memoryview:
    """theta's then momentum's float32 little-endian bytes: a view of their buffer when they
    are adjacent in one (no copy), else of one concatenation."""
    n = theta.numel()
    adjacent = (sys.byteorder == "little" and theta.is_contiguous() and momentum.is_contiguous()
                and theta.untyped_storage().data_ptr() == momentum.untyped_storage().data_ptr()
                and momentum.storage_offset() == theta.storage_offset() + n)
    if adjacent:
        whole = torch.empty(0, dtype=torch.float32).set_(theta.untyped_storage(), theta.storage_offset(), (2 * n,))
        return memoryview(whole.numpy()).cast("B")
    return memoryview(np.concatenate([theta.numpy(), momentum.numpy()]).astype("<f4", copy=False)).cast("B")


def _payload_digest(header: pb.StateHeader, payload: bytearray) -> str:
    """outer.digest of the state a received payload holds (views of it, no copy)."""
    values = torch.from_numpy(np.frombuffer(payload, dtype="<f4"))
    return digest(values[:header.numel], values[header.numel:], header.round, header.global_samples)


def _to_state(header: pb.StateHeader, payload: bytes | bytearray) -> GlobalState:
    """The tensors of a payload whose digest was checked against the header (_check): views of
    a bytearray (no copy of a large state), copies of read-only bytes."""
    arr = np.frombuffer(payload, dtype="<f4")
    if arr.size and not (np.isfinite(arr.min()) and np.isfinite(arr.max())):   # min/max propagate NaN
        raise ValueError("state holds non-finite values")
    if not arr.flags.writeable:
        arr = arr.copy()
    theta = torch.from_numpy(arr[:header.numel])
    momentum = torch.from_numpy(arr[header.numel:])
    state = GlobalState(theta=theta, momentum=momentum, round=header.round, global_samples=header.global_samples)
    state._digest = header.digest   # computed over these bytes in _check: not hashed again
    return state


async def _probe(channels: Channels, donor: Donor, min_round: int, me: str, expected_numel: int, spec_hash: str,
                 deadline: Deadline) -> None:
    """Asks `donor` for the header alone (a range at the end of the payload) and checks it."""
    req = pb.StateRequest(min_round=min_round, requester=me, offset=8 * expected_numel)
    call = channels.stub(donor.address).GetState(req, timeout=deadline.left(0.1))
    header = None
    try:
        async for chunk in call:
            header = chunk.header if chunk.HasField("header") else None
            if header is not None:   # its MAC covers the header (a reply is not signed)
                channels.signer.macs.state(header.sha256, donor.name).check(req.offset, chunk)
            break
    finally:
        call.cancel()
    if header is None:
        raise ValueError("donor sent no header")
    if header.numel != expected_numel or header.spec_hash != spec_hash:
        raise ValueError(f"donor offers {header.numel} values of spec {header.spec_hash}, "
                         f"expected {expected_numel} of {spec_hash}")
    if header.num_bytes != 8 * expected_numel or header.round < min_round or not header.sha256:
        raise ValueError(f"donor announces {header.num_bytes} bytes of round {header.round}, "
                         f"expected {8 * expected_numel} of round >= {min_round}")
    if header.sha256 != header.digest:
        raise ValueError(f"donor's header has sha256 {header.sha256[:12]} and digest {header.digest[:12]}; a "
                         "peer of this version sends the state's digest in both (is it an older version?)")
    donor.header = header


async def _probe_all(channels: Channels, donors: list[Donor], min_round: int, me: str, expected_numel: int,
                     spec_hash: str, deadline: Deadline) -> None:
    """Probes every donor at once; waits for the rest at most PROBE_GRACE_S after the first answer."""
    tasks = {asyncio.create_task(_probe(channels, d, min_round, me, expected_numel, spec_hash, deadline)): d
             for d in donors}
    waiting, until = set(tasks), deadline
    try:
        while waiting and not until.expired():
            done, waiting = await asyncio.wait(waiting, timeout=until.left(), return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                e = task.exception()
                if e is not None:
                    _failed(tasks[task], e)
                elif until is deadline:
                    until = deadline.sub(PROBE_GRACE_S)
    finally:
        late = TimeoutError("no header before the deadline" if until is deadline else
                            f"no header within {PROBE_GRACE_S:.0f} s of the first donor's")
        for task in waiting:
            task.cancel()
            _failed(tasks[task], late)
        await asyncio.gather(*waiting, return_exceptions=True)


def _failed(donor: Donor, e: BaseException) -> None:
    if not isinstance(e, grpc.aio.AioRpcError | ValueError | TimeoutError):
        raise e   # a bug here, not a donor's failure
    donor.failed = describe_rpc_error(e) if isinstance(e, grpc.aio.AioRpcError) else str(e) or type(e).__name__
    log.warning("state download from %s failed after 0 bytes: %s; not asking it", donor.name, donor.failed)


def _choose(donors: list[Donor]) -> tuple[pb.StateHeader, list[Donor]]:
    """The state most donors offer, and they; a tie goes to the newer round, then to the earlier
    donor (the caller lists the newest first). The others are marked as serving another state."""
    offers: dict[str, list[Donor]] = {}
    for d in donors:
        assert d.header is not None
        offers.setdefault(d.header.sha256, []).append(d)
    chosen = max(offers.values(), key=lambda ds: (len(ds), ds[0].header.round, -donors.index(ds[0])))
    header = chosen[0].header
    assert header is not None
    for d in donors:
        if d not in chosen and d.header is not None:
            d.other = d.header
            log.info("state download: %s serves round %d (sha256 %s), most donors round %d (sha256 %s); "
                     "not asking it", d.name, d.header.round, d.header.sha256[:12], header.round, header.sha256[:12])
    return header, chosen


class Received:
    """Payload bytes a download received, whether it succeeded or not (a rate measure)."""

    def __init__(self) -> None:
        self.num_bytes = 0


async def download(channels: Channels, donors: list[tuple[str, str]], min_round: int, me: str,
                   expected_numel: int, spec_hash: str, deadline: Deadline, *, range_bytes: int = RANGE_BYTES,
                   received: Received | None = None) -> GlobalState:
    """Downloads the state from several donors (peer id, address) at once, in byte ranges of
    the state most of them offer; donors of another state are dropped, and when none of the
    chosen state is left, it starts over from the state the others serve now."""
    asked: list[Donor] = []
    try:
        return await _download(channels, donors, min_round, me, expected_numel, spec_hash, deadline, range_bytes,
                               asked)
    finally:
        if received is not None:
            received.num_bytes += sum(d.served_bytes for d in asked)


async def _download(channels: Channels, donors: list[tuple[str, str]], min_round: int, me: str,
                    expected_numel: int, spec_hash: str, deadline: Deadline, range_bytes: int,
                    asked: list[Donor]) -> GlobalState:
    started, buf = time.monotonic(), bytearray(8 * expected_numel)
    request = pb.StateRequest(min_round=min_round, requester=me)
    errors: list[str] = []
    candidates = [Donor(peer_id, address) for peer_id, address in donors]
    asked += candidates
    while candidates and not deadline.expired():
        await _probe_all(channels, candidates, min_round, me, expected_numel, spec_hash, deadline)
        errors += [f"{d.name}: {d.failed}" for d in candidates if d.failed]
        offering = [d for d in candidates if not d.failed]
        if not offering:
            break
        header, chosen = _choose(offering)
        fetch = RangeFetch(channels, header, chosen, [(0, len(buf))], buf, request, deadline, range_bytes)
        if await fetch.run():
            try:
                state = await _check(channels, header, chosen, fetch, buf, request, deadline, range_bytes)
            except ValueError as e:
                errors.append(f"round {header.round} from {', '.join(d.name for d in chosen)}: {e}")
                break
            _log_done(state, chosen, time.monotonic() - started)
            return state
        errors += [f"{d.name}: {d.failed}" for d in chosen if d.failed and d.other is None]
        if deadline.expired():
            errors.append(f"the deadline passed with {fetch.left_bytes} of {len(buf)} bytes missing")
        candidates = [Donor(d.peer_id, d.address) for d in offering if d.other is not None]
        asked += candidates
        if candidates:
            log.info("state download: no donor serves round %d (sha256 %s) any more; starting over from the "
                     "state %d donors serve now", header.round, header.sha256[:12], len(candidates))
    raise RuntimeError(f"could not download the state of round >= {min_round}: "
                       + ("; ".join(errors) or "no live donor holds it"))


async def _check(channels: Channels, header: pb.StateHeader, donors: list[Donor], fetch: RangeFetch,
                 buf: bytearray, request: pb.StateRequest, deadline: Deadline, range_bytes: int) -> GlobalState:
    """The assembled state once its digest matches the header's sha256 (the digest, see StateSnapshot). On a mismatch, the bytes of one
    donor after another are refetched from the others, until the payload matches (that donor
    served corrupt bytes and is dropped) or every donor was tried."""
    loop = asyncio.get_running_loop()
    sha = await loop.run_in_executor(None, _payload_digest, header, buf)
    segments, tried = fetch.segments, set()
    while sha != header.sha256 and not deadline.expired():
        owners = [d for d in donors if d not in tried and any(seg[2] is d for seg in segments)]
        if not owners:
            break
        suspect = min(owners, key=lambda d: d.served_bytes)  # the cheapest to refetch first
        tried.add(suspect)
        others = [d for d in donors if not d.failed and d is not suspect]
        if not others:
            break
        spans = merge([(start, end) for start, end, d in segments if d is suspect])
        log.warning("state of round %d does not match its sha256; refetching the %.1f MB that %s served from "
                    "the others", header.round, sum(e - s for s, e in spans) / 1e6, suspect.name)
        refetch = RangeFetch(channels, header, others, spans, buf, request, deadline, range_bytes, compare=True)
        if not await refetch.run():
            break
        segments = [s for s in segments if s[2] is not suspect] + refetch.segments
        if refetch.differing_bytes:  # the suspect or one of the others served bad bytes: the sha256 says which
            sha = await loop.run_in_executor(None, _payload_digest, header, buf)
            guilty = sha == header.sha256
            log.warning("state download: %d bytes that %s served differ from the others' copies; %s",
                        refetch.differing_bytes, suspect.name,
                        "with theirs the state matches its sha256: dropped it" if guilty else "still no match")
            if guilty:
                suspect.failed = "served corrupt bytes"
    if sha != header.sha256:
        raise ValueError("state payload sha256 does not match its header")
    return await loop.run_in_executor(None, _to_state, header, buf)


def _log_done(state: GlobalState, donors: list[Donor], seconds: float) -> None:
    num_bytes = 8 * state.theta.numel()
    log.info("downloaded the state of round %d: %.1f MB in %.2f s (%.1f MB/s) from %d donors: %s", state.round,
             num_bytes / 1e6, seconds, num_bytes / 1e6 / max(seconds, 1e-9),
             sum(d.served_bytes > 0 for d in donors),
             ", ".join(f"{d.peer_id[-6:]} {d.served_bytes / 1e6:.1f} MB" + (f" ({d.failed})" if d.failed else "")
                       for d in donors))
