"""Byte ranges of one state fetched from several donors at once into one preallocated buffer:
each donor's calls take the next unassigned range (so a donor's share follows its rate), an idle
donor takes over the tail of a slower one's range, and a failed donor's unwritten bytes go back
to the others. Runs on the network loop; checks each range's framing, not its bytes (state_sync)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass, field

import grpc

from peer._proto import peer_pb2 as pb
from peer.net.client import CHUNK_BYTES, Channels, describe_rpc_error
from peer.net.loop import Deadline

log = logging.getLogger(__name__)
RANGE_BYTES = 4 << 20        # one call asks for this much: its header and round trip are noise next to it
CALLS_PER_DONOR = 2          # two calls in flight per donor hide the round trip between its ranges
MIN_STEAL_BYTES = 128 << 10  # a tail shorter than this is not worth another call, unless its donor stalls
MEASURE_S = 0.5              # a donor's rate counts once it was busy this long (or served a chunk)
STALL_S = 1.0                # a range that got no chunk for this long, nor in the time the thief would
                             # take for 4 chunks, has stalled (or is so slow that the thief takes it all)
RECHECK_S = 0.25             # an idle call looks for a tail to take over this often


class OtherState(Exception):
    """The donor now serves another state than the one this download assembles."""

    def __init__(self, header: pb.StateHeader):
        super().__init__(f"now serves round {header.round} (sha256 {header.sha256[:12]})")
        self.header = header


@dataclass(eq=False)
class Donor:
    """One donor in one download: what it offers, what it served, and why it left ("" = serving)."""

    peer_id: str
    address: str
    header: pb.StateHeader | None = None
    other: pb.StateHeader | None = None   # the state it moved on to, when that is why it left
    failed: str = ""
    served_bytes: int = 0
    active_calls: int = 0
    busy_s: float = 0.0
    busy_since: float = 0.0

    @property
    def name(self) -> str:
        return f"{self.peer_id[-6:]} at {self.address}"

    def rate_bps(self) -> float | None:
        """Bytes per second while it had a call open; None before that means anything."""
        busy = self.busy_s + (time.monotonic() - self.busy_since if self.active_calls else 0.0)
        if busy <= 0 or (busy < MEASURE_S and self.served_bytes == 0):
            return None
        return self.served_bytes / busy

    def call_started(self) -> None:
        if self.active_calls == 0:
            self.busy_since = time.monotonic()
        self.active_calls += 1

    def call_ended(self) -> None:
        self.active_calls -= 1
        if self.active_calls == 0:
            self.busy_s += time.monotonic() - self.busy_since


@dataclass(eq=False)
class _Range:
    start: int
    end: int       # exclusive; lowered when another donor takes over the tail
    cursor: int    # the bytes before it are written
    donor: Donor
    progress_at: float = field(default_factory=time.monotonic)   # when a chunk last came

    @property
    def left(self) -> int:
        return self.end - self.cursor


class RangeFetch:
    """One pass over the `spans` (start, end) of `header`'s payload, written into `buf` by
    `donors`. `compare`: count the bytes that differ from those already in `buf` (a refetch)."""

    def __init__(self, channels: Channels, header: pb.StateHeader, donors: list[Donor],
                 spans: list[tuple[int, int]], buf: bytearray, request: pb.StateRequest, deadline: Deadline,
                 range_bytes: int = RANGE_BYTES, compare: bool = False):
        self.channels, self.header, self.donors = channels, header, donors
        self.buf, self.mv = buf, memoryview(buf)
        self.request, self.deadline = request, deadline
        self.range_bytes, self.compare = range_bytes, compare
        self.pending: deque[tuple[int, int]] = deque(spans)
        self.left_bytes = sum(end - start for start, end in spans)
        self.in_flight: list[_Range] = []
        self.segments: list[tuple[int, int, Donor]] = []   # who wrote which bytes
        self.differing_bytes = 0
        self._changed = asyncio.Event()
        self._done = asyncio.Event()

    async def run(self) -> bool:
        """True when every byte of the spans was written; False when no donor can go on, or
        the deadline passed first."""
        calls = [asyncio.create_task(self._calls(d)) for d in self.donors for _ in range(CALLS_PER_DONOR)]
        done = asyncio.create_task(self._done.wait())  # a call stuck on a donor whose tail was taken
        try:                                            # over must not hold up the end
            running: set[asyncio.Task] = set(calls)
            while running and not self._done.is_set() and not self.deadline.expired():
                _, running = await asyncio.wait(running | {done}, timeout=self.deadline.left(),
                                                return_when=asyncio.FIRST_COMPLETED)
                running.discard(done)
        finally:
            for task in (*calls, done):
                task.cancel()
            await asyncio.gather(*calls, return_exceptions=True)
        for task in calls:   # a call ends on a donor's failure by itself: anything else is a bug
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
        return self.left_bytes == 0

    def _notify(self) -> None:
        self._changed.set()   # wakes every waiter now; the next ones wait for the next change
        self._changed.clear()

    async def _calls(self, donor: Donor) -> None:
        """One call slot of a donor: takes ranges until none is left or the donor fails."""
        while not donor.failed and self.left_bytes > 0 and not self.deadline.expired():
            r = self._take(donor)
            if r is None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), min(RECHECK_S, self.deadline.left()))
                continue
            try:
                await self._fetch(r)
            except (grpc.aio.AioRpcError, ValueError, TimeoutError, OtherState) as e:
                self._drop(donor, r, e)
            finally:
                self._settle(r)

    def _take(self, donor: Donor) -> _Range | None:
        """The next unassigned range, else the tail of the in-flight range expected to end last."""
        if self.pending:
            start, end = self.pending.popleft()
            if end - start > self.range_bytes:
                self.pending.appendleft((start + self.range_bytes, end))
                end = start + self.range_bytes
            r = _Range(start, end, start, donor)
        else:
            r = self._steal(donor)
            if r is None:
                return None
        self.in_flight.append(r)
        return r

    def _steal(self, thief: Donor) -> _Range | None:
        """The tail of the range that will end last, split so that both calls end about together
        (all of it when its donor stalls)."""
        mine = max(self._call_rate(thief, extra=1), 1.0)
        stall_s, now = max(STALL_S, 4 * CHUNK_BYTES / mine), time.monotonic()
        rates = {r: 0.0 if now - r.progress_at > stall_s or r.donor.rate_bps() == 0.0 else self._call_rate(r.donor)
                 for r in self.in_flight if r.donor is not thief and r.left > 0}
        if not rates:
            return None
        victim = max(rates, key=lambda r: r.left / rates[r] if rates[r] > 0 else float("inf"))
        theirs = rates[victim]
        split = victim.cursor + int(victim.left * theirs / (theirs + mine))
        if split > victim.cursor and victim.end - split < MIN_STEAL_BYTES:
            return None
        r = _Range(split, victim.end, split, thief)
        victim.end = split
        return r

    def _call_rate(self, donor: Donor, extra: int = 0) -> float:
        """What one call of `donor` moves per second (its calls share its uplink)."""
        rate = donor.rate_bps()
        if rate is None:
            known = [x for x in (d.rate_bps() for d in self.donors) if x]
            rate = sum(known) / len(known) if known else 1.0
        return rate / max(1, donor.active_calls + extra)

    async def _fetch(self, r: _Range) -> None:
        donor, asked_end = r.donor, r.end
        req = pb.StateRequest(min_round=self.request.min_round, requester=self.request.requester,
                              offset=r.start, length=asked_end - r.start, sha256=self.header.sha256)
        call = self.channels.stub(donor.address).GetState(req, timeout=self.deadline.left(0.1))
        donor.call_started()
        pos, first = r.start, True
        macs = self.channels.signer.macs
        mac = macs.state(self.header.sha256, donor.name)
        try:
            async for chunk in call:
                if first and chunk.header != self.header:
                    if not chunk.HasField("header"):
                        raise ValueError("no header")
                    macs.state(chunk.header.sha256, donor.name).check(pos, chunk)
                    raise OtherState(chunk.header)
                mac.check(pos, chunk)
                first = False
                n = len(chunk.data)
                if pos + n > asked_end:
                    raise ValueError(f"donor sent more than the {asked_end - r.start} bytes asked at {r.start}")
                self._write(r, pos, memoryview(chunk.data)[:max(0, r.end - pos)])
                pos += n
                if pos >= r.end:
                    return  # the whole range, or all but a tail another donor took over
            raise ValueError(f"donor ended the range at {r.start} after {pos - r.start} of {asked_end - r.start} "
                             "bytes")
        finally:
            call.cancel()
            donor.call_ended()

    def _write(self, r: _Range, pos: int, data: memoryview) -> None:
        n = len(data)
        if not n:
            return
        if self.compare and self.mv[pos:pos + n].tobytes() != data:
            self.differing_bytes += n
        self.mv[pos:pos + n] = data
        r.cursor, r.progress_at = pos + n, time.monotonic()
        r.donor.served_bytes += n
        self.left_bytes -= n
        if self.left_bytes == 0:
            self._done.set()
            self._notify()

    def _settle(self, r: _Range) -> None:
        """A call ended: its written bytes are recorded, its unwritten ones go back to the others."""
        self.in_flight.remove(r)
        if r.cursor > r.start:
            self.segments.append((r.start, r.cursor, r.donor))
        if r.left > 0:
            self.pending.appendleft((r.cursor, r.end))
            self._notify()

    def _drop(self, donor: Donor, r: _Range, e: Exception) -> None:
        if donor.failed:
            return
        if isinstance(e, OtherState):
            donor.other, donor.failed = e.header, str(e)
            log.info("state download: %s %s, not round %d (sha256 %s); dropped from this download",
                     donor.name, e, self.header.round, self.header.sha256[:12])
        else:
            donor.failed = describe_rpc_error(e) if isinstance(e, grpc.aio.AioRpcError) else str(e) or "timed out"
        if not donor.other:
            rest = [d for d in self.donors if not d.failed]
            log.warning("state download from %s failed after %d bytes: %s; %s", donor.name, donor.served_bytes,
                        donor.failed, f"its {sum(x.left for x in self.in_flight if x.donor is donor)} unwritten "
                        f"bytes go to the {len(rest)} other donors" if rest else "no other donor left")
        self._notify()


def merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted spans with touching or overlapping ones joined."""
    out: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out
