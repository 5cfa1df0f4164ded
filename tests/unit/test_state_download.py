"""State download over real gRPC servers on loopback (a peer's own servicer and core): several
donors serve byte ranges at once; a donor that dies, stalls, serves corrupt bytes or another
state is replaced by the others, and the result equals the donors' state bitwise; when no donor
of the chosen state is left, the download starts over from the state the others serve."""

from __future__ import annotations

import asyncio
import logging
import re
import time

import grpc
import numpy as np
import pytest
import torch

from peer._proto import peer_pb2 as pb
from peer.config import PeerConfig
from peer.net.client import CHUNK_BYTES
from peer.net.core import NetCore
from peer.net.loop import Deadline
from peer.net.server import Servicer, start_server
from peer.net.state_ranges import CALLS_PER_DONOR
from peer.net.state_sync import StateSnapshot, download
from peer.outer import GlobalState, outer_step
from tests.fixtures import channels as signed_channels
from tests.fixtures import named

pytestmark = pytest.mark.timeout(60)
NUMEL = 300_000                 # 2.4 MB: three chunks
NUM_BYTES = 8 * NUMEL
RANGE_BYTES = 256 << 10         # about ten ranges, so that three donors each serve several


def state(seed: int, round_: int = 7) -> GlobalState:
    g = torch.Generator().manual_seed(seed)
    return GlobalState(torch.randn(NUMEL, generator=g), torch.randn(NUMEL, generator=g), round_, 1234)


def snapshot(seed: int, round_: int = 7) -> StateSnapshot:
    return StateSnapshot.of(state(seed, round_), "spec")


def same(a: GlobalState, b: GlobalState) -> bool:
    return (torch.equal(a.theta, b.theta) and torch.equal(a.momentum, b.momentum)
            and (a.round, a.global_samples) == (b.round, b.global_samples))


class Donor(Servicer):
    """A peer's servicer and core holding `snap`; counts the payload bytes it sends in ranges
    and can break after `fail_after` of them: "die" (its server stops), "stall" (it stops
    sending), "switch" (it moves on to the `then` snapshot); `corrupt` flips every byte it sends;
    `rate_bps` caps its uplink (its calls take turns to sleep as long as their chunks would take);
    `secret`: a peer of that private run (its chunks carry MACs, which `corrupt` leaves as they are)."""

    def __init__(self, snap: StateSnapshot, fail_after: int | None = None, how: str = "die",
                 then: StateSnapshot | None = None, corrupt: bool = False, rate_bps: float | None = None,
                 secret: str = ""):
        super().__init__(NetCore(None, PeerConfig(run_secret=secret), named("donor")))
        self.core.snapshot = snap
        self.fail_after, self.how, self.then, self.corrupt = fail_after, how, then, corrupt
        self.rate_bps, self.uplink = rate_bps, asyncio.Lock()   # its calls share one uplink this fast
        self.requests: list[tuple[int, int]] = []
        self.sent_bytes = self.calls = self.most_calls = 0
        self.server: grpc.aio.Server | None = None

    async def GetState(self, request, context):
        self.requests.append((request.offset, request.length))
        self.calls += 1
        self.most_calls = max(self.most_calls, self.calls)
        try:
            await super().GetState(request, _Counting(self, context))
        finally:
            self.calls -= 1

    async def sent(self, chunk: pb.StateChunk) -> pb.StateChunk:
        self.sent_bytes += len(chunk.data)
        if self.rate_bps:
            async with self.uplink:
                await asyncio.sleep(len(chunk.data) / self.rate_bps)
        if self.fail_after is not None and self.sent_bytes > self.fail_after:
            self.fail_after = None
            if self.how == "die":
                assert self.server is not None
                asyncio.get_running_loop().create_task(self.server.stop(None))
                await asyncio.Event().wait()   # cancelled by the stop
            elif self.how == "stall":
                await asyncio.Event().wait()
            elif self.how == "switch":   # as a peer whose round moved on: it keeps the previous state
                self.core.held.put(self.then)
        if self.corrupt:
            chunk = pb.StateChunk(header=chunk.header, data=bytes(b ^ 0xFF for b in chunk.data), mac=chunk.mac)
        return chunk


class _Counting:
    """The servicer context with every written chunk passed through its donor first."""

    def __init__(self, donor: Donor, context):
        self.donor, self.context = donor, context

    async def write(self, chunk: pb.StateChunk) -> None:
        await self.context.write(await self.donor.sent(chunk))

    def __getattr__(self, name):
        return getattr(self.context, name)


async def serve(donor: Donor) -> str:
    server, port = await start_server(donor.core, "127.0.0.1", 0, donor)
    donor.server = server
    return f"127.0.0.1:{port}"


def run_download(donors: list[Donor], deadline_s: float = 30, secret: str = "") -> GlobalState:
    async def body():
        addresses = [await serve(d) for d in donors]
        channels = signed_channels(secret=secret)
        try:
            return await download(channels, [(f"donor{i}", a) for i, a in enumerate(addresses)], 0,
                                  "newcomer", NUMEL, "spec", Deadline(deadline_s), range_bytes=RANGE_BYTES)
        finally:
            await channels.close()
            for d in donors:
                assert d.server is not None
                await d.server.stop(None)
    return asyncio.run(body())


def test_chunks_cover_exactly_the_range():
    snap = snapshot(1)
    for offset, length in [(0, 0), (5, 0), (0, CHUNK_BYTES), (CHUNK_BYTES - 3, CHUNK_BYTES + 7), (NUM_BYTES, 0),
                           (NUM_BYTES - 1, 1)]:
        chunks = list(snap.chunks(offset, length))
        assert chunks[0].header == snap.header and not any(c.HasField("header") for c in chunks[1:])
        assert all(len(c.data) <= CHUNK_BYTES for c in chunks)
        end = offset + length if length else NUM_BYTES
        assert b"".join(c.data for c in chunks) == snap.payload[offset:end]


def test_snapshot_of_an_outer_step_shares_its_tensors_and_downloads_whole():
    """outer_step's theta and momentum lie in one buffer: the snapshot serves it without a copy,
    its bytes are theta's then momentum's, its sha256 is the digest, and a download of it gives
    the same state (checked by that digest)."""
    s = state(3)
    theta, momentum = outer_step(s.theta, s.momentum, torch.randn(NUMEL) * 0.01, 0.7, 0.9)
    new = GlobalState(theta, momentum, 8, 1300)
    snap = StateSnapshot.of(new, "spec")
    assert np.shares_memory(np.frombuffer(snap.payload, dtype=np.float32), theta.numpy())
    assert snap.payload == theta.numpy().tobytes() + momentum.numpy().tobytes()
    assert snap.header.sha256 == snap.header.digest == new.digest()
    copied = StateSnapshot.of(s, "spec")   # apart in memory: one copy, the same layout
    assert not np.shares_memory(np.frombuffer(copied.payload, dtype=np.float32), s.theta.numpy())
    assert copied.payload == s.theta.numpy().tobytes() + s.momentum.numpy().tobytes()
    got = run_download([Donor(snap), Donor(snap)])
    assert same(got, new) and got.digest() == new.digest()


def test_several_donors_each_serve_a_part(caplog):
    s = state(1)
    snap = StateSnapshot.of(s, "spec")
    donors = [Donor(snap) for _ in range(3)]
    with caplog.at_level(logging.INFO, logger="peer.net.state_sync"):
        got = run_download(donors)
    assert same(got, s)
    assert all(d.most_calls <= CALLS_PER_DONOR for d in donors)
    assert all(0 <= o and 0 <= n and o + n <= NUM_BYTES for d in donors for o, n in d.requests)
    done = [r.getMessage() for r in caplog.records if "downloaded the state of round 7" in r.getMessage()]
    assert len(done) == 1 and "from 3 donors" in done[0] and "MB/s" in done[0], done
    served = [float(mb) for mb in re.findall(r"donor\d (\d+\.\d) MB", done[0])]   # as the newcomer wrote them
    assert len(served) == 3 and all(mb > 0 for mb in served) and sum(served) == pytest.approx(2.4, abs=0.15), done
    # a donor whose tail another took over sent a little more than was used, up to the cut
    assert NUM_BYTES <= sum(d.sent_bytes for d in donors) < 2 * NUM_BYTES


def test_faster_donor_serves_more(caplog):
    s = state(14)
    snap = StateSnapshot.of(s, "spec")
    slow, fast = Donor(snap, rate_bps=2e6), Donor(snap, rate_bps=8e6)
    started = time.monotonic()
    with caplog.at_level(logging.INFO, logger="peer.net.state_sync"):
        got = run_download([slow, fast])
    seconds = time.monotonic() - started
    assert same(got, s)
    done = next(r.getMessage() for r in caplog.records if "downloaded the state" in r.getMessage())
    served = dict(re.findall(r"(donor\d) (\d+\.\d) MB", done))
    assert float(served["donor1"]) > 1.5 * float(served["donor0"]), done
    assert seconds > 0.8 * NUM_BYTES / 10e6, "the uplinks are capped at 2 + 8 MB/s"


def test_killed_donor_leaves_its_ranges_to_the_others(caplog):
    s = state(2)
    snap = StateSnapshot.of(s, "spec")
    dying = Donor(snap, fail_after=300_000)
    donors = [Donor(snap), dying, Donor(snap)]
    got = run_download(donors)
    assert same(got, s)
    assert dying.sent_bytes > 0 and all(d.sent_bytes > 0 for d in donors)
    assert re.search(r"state download from donor1 at \S+ failed after \d+ bytes", caplog.text), caplog.text


def test_stalled_donor_has_its_ranges_taken_over():
    s = state(3)
    snap = StateSnapshot.of(s, "spec")
    stalled = Donor(snap, fail_after=100_000, how="stall")
    started = time.monotonic()
    got = run_download([stalled, Donor(snap)], deadline_s=30)
    assert same(got, s)
    assert time.monotonic() - started < 10, "the live donor should take over, not wait for the deadline"


def test_donor_of_another_state_is_dropped():
    s = state(4)
    snap = StateSnapshot.of(s, "spec")
    other = Donor(snapshot(5, round_=8))
    got = run_download([other, Donor(snap), Donor(snap)])   # most donors win over the newer round
    assert same(got, s)
    assert other.sent_bytes == 0 and other.requests == [(NUM_BYTES, 0)], "only its header was asked for"


def test_download_starts_over_when_no_donor_of_the_chosen_state_is_left(caplog):
    newer = state(6, round_=8)
    snap = snapshot(7)
    doomed = [Donor(snap, fail_after=200_000), Donor(snap, fail_after=200_000)]
    last = Donor(StateSnapshot.of(newer, "spec"))
    got = run_download([*doomed, last])
    assert same(got, newer)
    assert last.sent_bytes == NUM_BYTES
    assert "starting over" in caplog.text


def test_donors_moving_on_to_a_new_round_mid_download_still_finish_the_state_it_began():
    began = state(9)
    then = StateSnapshot.of(state(8, round_=8), "spec")
    donors = [Donor(StateSnapshot.of(began, "spec"), fail_after=500_000, how="switch", then=then)
              for _ in range(2)]
    got = run_download(donors)
    assert same(got, began), "no restart: the donors serve the state the download chose"
    assert sum(d.sent_bytes for d in donors) <= NUM_BYTES + 2 * RANGE_BYTES


def test_corrupt_range_is_refetched_from_the_other_donors(caplog):
    s = state(10)
    snap = StateSnapshot.of(s, "spec")
    bad = Donor(snap, corrupt=True)
    donors = [Donor(snap), bad, Donor(snap)]
    got = run_download(donors)
    assert same(got, s)
    assert bad.sent_bytes > 0
    assert re.search(r"that donor1 at \S+ served differ from the others' copies; with theirs the state matches "
                     r"its sha256: dropped it", caplog.text), caplog.text
    done = [r.getMessage() for r in caplog.records if "downloaded the state" in r.getMessage()]
    assert len(done) == 1 and "donor1" in done[0] and done[0].count("served corrupt bytes") == 1, done


def test_in_a_private_run_a_range_changed_in_flight_fails_its_mac_at_once(caplog):
    """As a man in the middle would: a donor's bytes change after they were sealed. The first chunk
    fails its MAC (the donor is dropped before it wrote a byte), the others serve, no refetch."""
    s = state(12)
    snap = StateSnapshot.of(s, "spec")
    secret = "a-long-run-secret-0123456789"
    bad = Donor(snap, corrupt=True, secret=secret)
    got = run_download([Donor(snap, secret=secret), bad, Donor(snap, secret=secret)], secret=secret)
    assert same(got, s)
    assert re.search(r"state download from donor1 at \S+ failed after 0 bytes: state \w+ from donor1 at \S+: the "
                     r"chunk at byte \d+ fails its MAC", caplog.text), caplog.text
    assert "served differ" not in caplog.text, "refused chunk by chunk, not found by the digest afterwards"


def test_corrupt_payload_with_no_other_donor_is_refused():
    with pytest.raises(RuntimeError, match="sha256"):
        run_download([Donor(snapshot(11), corrupt=True)])


def test_donor_of_another_spec_is_named_in_the_error():
    snap = StateSnapshot.of(state(12), "other-spec")
    with pytest.raises(RuntimeError, match=r"donor0 at .*spec other-spec"):
        run_download([Donor(snap)])


def test_server_serves_exactly_the_range_and_rejects_a_bad_one():
    snap = snapshot(13)

    async def body():
        core = NetCore(None, PeerConfig(), named("donor"))
        core.snapshot = snap
        server, port = await start_server(core, "127.0.0.1", 0)
        channels = signed_channels()
        stub = channels.stub(f"127.0.0.1:{port}")

        async def get(offset: int, length: int) -> list[pb.StateChunk]:
            req = pb.StateRequest(min_round=0, requester="t", offset=offset, length=length)
            return [c async for c in stub.GetState(req, timeout=10)]

        try:
            chunks = await get(CHUNK_BYTES - 5, CHUNK_BYTES + 10)
            assert chunks[0].header == snap.header
            assert b"".join(c.data for c in chunks) == snap.payload[CHUNK_BYTES - 5:2 * CHUNK_BYTES + 5]
            for offset, length in [(0, -1), (0, NUM_BYTES + 1), (NUM_BYTES - 4, 5), (NUM_BYTES + 1, 0), (-1, 0)]:
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await get(offset, length)
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (offset, length)
                # a negative number is refused before the handler (validate.numbers), naming the field;
                # a range outside the state by the handler, naming the state's size
                said = "StateRequest.length is -1" if length < 0 else "StateRequest.offset is -1" if offset < 0 \
                    else f"state of {NUM_BYTES} bytes"
                assert said in e.value.details(), (offset, length, e.value.details())
        finally:
            await channels.close()
            await server.stop(None)
    asyncio.run(body())
