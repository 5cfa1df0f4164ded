"""Uneven links: shard bounds follow the members' upload rates (shardmap.shard_plan), a far slower
peer owns no shard, and the --max-upload-mbit token bucket never lets more through than its
rate allows (its accounting, checked on an injected clock: nothing here is timed)."""

import asyncio
import math

import pytest

from peer._proto import peer_pb2 as pb
from peer.config import ConfigError, PeerConfig, validate_peer
from peer.net import swarm
from peer.net.round import make_roster, roster_hash
from peer.net.shardmap import SHARD_ALIGN, SLOW_FRACTION, shard_plan
from peer.net.upload import RateMeter, UploadCap, cap_bps, paced, upload_estimate

IDS = ["a", "b", "c", "d"]
NUMEL = 1_000_003


def sizes(bounds):
    return [hi - lo for lo, hi in zip(bounds, bounds[1:], strict=False)]


def check_shape(owners, bounds, numel):
    assert bounds[0] == 0 and bounds[-1] == numel and len(bounds) == len(owners) + 1
    assert all(s > 0 for s in sizes(bounds)), "no owner gets an empty shard"
    assert all(b % SHARD_ALIGN == 0 for b in bounds[:-1]), "every inner bound is aligned"


def test_shards_are_proportional_to_the_upload_rates():
    rates = [100e6, 50e6, 25e6, 25e6]
    owners, bounds = shard_plan(NUMEL, IDS, rates)
    assert owners == IDS
    check_shape(owners, bounds, NUMEL)
    for size, rate in zip(sizes(bounds), rates, strict=True):
        assert abs(size - NUMEL * rate / sum(rates)) <= 2 * SHARD_ALIGN
    assert sizes(bounds)[0] > 3 * sizes(bounds)[3]


def test_unknown_rates_count_at_the_median_and_none_known_gives_equal_shards():
    owners, bounds = shard_plan(NUMEL, IDS, [0.0] * 4)
    assert max(sizes(bounds)) - min(sizes(bounds)) <= 2 * SHARD_ALIGN
    _, mixed = shard_plan(NUMEL, IDS, [80e6, 0.0, 40e6, float("nan")])   # lower median of 40, 80: 40
    assert abs(sizes(mixed)[1] - sizes(mixed)[2]) <= SHARD_ALIGN
    assert abs(sizes(mixed)[3] - sizes(mixed)[2]) <= SHARD_ALIGN


def test_a_peer_far_below_the_median_owns_no_shard():
    median = 100e6
    slow = median / SLOW_FRACTION * 0.9
    owners, bounds = shard_plan(NUMEL, IDS, [median, median, slow, median])
    assert owners == ["a", "b", "d"]
    check_shape(owners, bounds, NUMEL)
    kept, _ = shard_plan(NUMEL, IDS, [median, median, median / SLOW_FRACTION * 1.1, median])
    assert kept == IDS, "just above the threshold it still owns a (small) shard"
    alone, b = shard_plan(NUMEL, ["a"], [1.0])
    assert alone == ["a"] and b == [0, NUMEL]


def test_every_kept_owner_gets_at_least_one_unit():
    rates = [1e9, 1e9, 1.01e9 / SLOW_FRACTION]     # just over the threshold: kept, with a small share
    owners, bounds = shard_plan(3 * SHARD_ALIGN + 5, ["a", "b", "c"], rates)
    assert owners == ["a", "b", "c"] and min(sizes(bounds)) >= SHARD_ALIGN
    owners, bounds = shard_plan(10, ["a", "b"], [5e6, 1e6])   # too small for 4096: the unit halves
    assert bounds[0] == 0 and bounds[-1] == 10 and min(sizes(bounds)) > 0
    with pytest.raises(ValueError, match="cannot split 1 values among 2"):
        shard_plan(1, ["a", "b"], [1.0, 1.0])
    with pytest.raises(ValueError, match="one rate per serving peer"):
        shard_plan(10, ["a"], [1.0, 2.0])


def test_bounds_come_from_the_roster_inputs_alone():
    members = [pb.Member(peer_id=p, address=f"127.0.0.1:{i + 1}", weight=1.0, samples=1,
                         upload_bps=r) for i, (p, r) in enumerate(zip(IDS, [9e6, 3e6, 0.1e6, 5e6], strict=True))]
    client = pb.Member(peer_id="e", weight=1.0, samples=1, client_mode=True, upload_bps=50e6)
    one = make_roster(3, "a", [*members, client], "int8", NUMEL)
    two = make_roster(3, "a", [client, *reversed(members)], "int8", NUMEL)   # another join order
    assert list(one.shard_bounds) == list(two.shard_bounds) and one.hash == two.hash
    assert list(one.owners) == ["a", "b", "d"], "c is slow, e is a client: neither owns a shard"
    check_shape(list(one.owners), list(one.shard_bounds), NUMEL)
    changed = pb.Roster()
    changed.CopyFrom(one)
    changed.members[0].upload_bps = 1.0
    assert roster_hash(changed) != one.hash, "the hash covers the rates the bounds came from"


def test_equal_shard_sizing_gives_every_serving_member_an_equal_shard():
    """--shard-sizing equal (the run spec): rates are ignored, the slow peer owns a shard like the others."""
    members = [pb.Member(peer_id=p, address=f"127.0.0.1:{i + 1}", weight=1.0, samples=1,
                         upload_bps=r) for i, (p, r) in enumerate(zip(IDS, [9e6, 3e6, 0.1e6, 5e6], strict=True))]
    client = pb.Member(peer_id="e", weight=1.0, samples=1, client_mode=True, upload_bps=50e6)
    roster = make_roster(3, "a", [*members, client], "int8", NUMEL, sizing="equal")
    assert list(roster.owners) == IDS[:4], "every serving member owns a shard, the client none"
    check_shape(list(roster.owners), list(roster.shard_bounds), NUMEL)
    assert max(sizes(roster.shard_bounds)) - min(sizes(roster.shard_bounds)) <= SHARD_ALIGN
    assert list(roster.shard_bounds) != list(make_roster(3, "a", [*members, client], "int8", NUMEL).shard_bounds)


class FakeClock:
    def __init__(self):
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.now += s


class Watched(UploadCap):
    """Records (time, bytes let through so far, tokens) after every grant."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.trace: list[tuple[float, int, float]] = []

    async def take(self, num_bytes: int) -> None:
        await super().take(num_bytes)
        self.trace.append((self.clock(), self.taken, self.tokens))


def test_the_bucket_lets_through_at_most_burst_plus_rate_times_time():
    clock = FakeClock()
    rate, burst = 1000.0, 4096
    cap = Watched(rate, burst, clock=clock, sleep=clock.sleep)

    async def stream(n_chunks: int, size: int):
        for _ in range(n_chunks):
            await cap.take(size)

    async def body():
        await asyncio.gather(stream(20, 3000), stream(10, 5000), stream(5, 10_000))

    asyncio.run(body())
    total = 20 * 3000 + 10 * 5000 + 5 * 10_000
    assert cap.taken == total
    assert all(tokens >= 0 for _, _, tokens in cap.trace), "tokens never go below zero"
    assert all(taken <= burst + rate * t + 1e-6 for t, taken, _ in cap.trace)
    assert clock.now >= (total - burst) / rate - 1e-9, "B bytes at rate R take at least (B - burst) / R"
    assert math.isclose(cap.waited_s, clock.now)


def test_no_cap_never_waits_and_a_cancelled_wait_takes_nothing():
    clock = FakeClock()
    free = UploadCap(0.0, clock=clock, sleep=clock.sleep)
    asyncio.run(free.take(10 << 20))
    assert clock.sleeps == [] and free.taken == 10 << 20

    async def cancelled():
        cap = UploadCap(1000.0, 1000)   # the real clock: the wait is cancelled long before it ends
        await cap.take(1000)
        task = asyncio.ensure_future(cap.take(1000))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return cap

    cap = asyncio.run(cancelled())
    assert cap.taken == 1000 and cap.tokens < 1000
    with pytest.raises(ValueError, match="finite rate"):
        UploadCap(float("inf"))


def test_paced_releases_every_chunk_through_the_bucket():
    clock = FakeClock()
    cap = UploadCap(500.0, 1000, clock=clock, sleep=clock.sleep)
    chunks = [pb.ShardChunk(data=b"x" * 1000) for _ in range(4)]

    async def body():
        return [c async for c in paced(cap, chunks)]

    assert asyncio.run(body()) == chunks
    assert cap.taken == 4000 and clock.now >= 3000 / 500.0


def test_the_announced_rate_is_measured_and_capped():
    meter = RateMeter()
    assert upload_estimate(meter, 0.0) == 0.0                 # nothing known
    assert upload_estimate(meter, cap_bps(8)) == 1e6          # the cap, an upper bound, until measured
    meter.observe(10_000_000, 2.0)
    assert upload_estimate(meter, 0.0) == 5e6
    assert upload_estimate(meter, cap_bps(8)) == 1e6
    rec = swarm.PeerRecord("x", "h:1", 0, 0, 0, 0.0, False, False, 0, "s", 1.0, swarm.WAIT, 5e6)
    assert swarm.PeerRecord.parse("x", rec.to_value()) == rec
    assert swarm.PeerRecord.parse("x", {**rec.to_value(), "upload_bps": -1.0}) is None
    old = {k: v for k, v in rec.to_value().items() if k != "upload_bps"}
    assert swarm.PeerRecord.parse("x", old).upload_bps == 0.0   # a record without it: not known


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_max_upload_mbit_is_checked(bad):
    with pytest.raises(ConfigError, match="--max-upload-mbit"):
        validate_peer(PeerConfig(max_upload_mbit=bad))
    validate_peer(PeerConfig(max_upload_mbit=12.5))
