"""The trigger: members report their inner steps to the round's leader over gRPC (Progress),
and the leader shares the steps still missing by the members' rates, so the swarm's summed
steps close the round at its target, not a DHT refresh later."""

from __future__ import annotations

import asyncio
import dataclasses
import time

from hivemind.utils import get_dht_time

from peer.config import PeerConfig, RunSpec
from peer.net import swarm
from peer.net.core import NetCore
from peer.net.round import Tally, leader_rank
from peer.net.server import start_server
from tests.fixtures import identity, named

TARGET = 150


def simulate(t: Tally, rates: dict[str, float], report_every: int = 10) -> dict[str, int]:
    """Members step at their rates (ticks of 10 ms), report every `report_every` ticks, and,
    as Node.should_stop does, ask again when they reach what they were allowed."""
    steps = {p: 0 for p in rates}
    allowed = {p: 0 for p in rates}
    done: set[str] = set()
    for tick in range(1, 2000):
        now = tick * 0.01
        for p in rates:
            if p in done:
                continue
            if tick % report_every == 0 or steps[p] >= allowed[p]:
                allowed[p], stop, _ = t.report(p, steps[p], rates[p], now)
                if stop:
                    done.add(p)
                    continue
            if steps[p] < allowed[p] and tick % max(1, round(100 / rates[p])) == 0:
                steps[p] += 1
        if len(done) == len(rates):
            break
    return steps


def test_tally_closes_the_round_at_its_target_shared_by_rate():
    steps = simulate(Tally(TARGET), {"a": 100.0, "b": 50.0, "c": 10.0})
    assert TARGET - 3 <= sum(steps.values()) <= TARGET, steps
    assert steps["a"] > steps["b"] > steps["c"], "a faster member does more of the round"


def test_a_lease_is_small_enough_to_leave_room_for_members_heard_later():
    t = Tally(1000)
    allowed_a, stop, _ = t.report("a", 0, 100.0, 0.0)
    assert not stop and allowed_a <= 100 * 0.5 + 1, "a first reporter does not take the whole round"
    allowed_b, _, _ = t.report("b", 0, 100.0, 0.0)
    assert allowed_b > 0


def test_a_silent_member_no_longer_holds_its_lease():
    t = Tally(100)
    t.report("a", 0, 100.0, 0.0)
    lease_b, _, _ = t.report("b", 0, 100.0, 0.0)   # b leases some steps, then dies
    assert lease_b > 0
    allowed_a, stop, held = t.report("a", 50, 100.0, 0.4)
    assert not stop and held == 50 + lease_b, "b's lease is held while it may still use it"
    allowed_a, stop, held = t.report("a", 60, 100.0, 2.0)
    assert not stop and held == 60, "after PROGRESS_STALE_S only b's reported steps (0) count"


def core_for(name: str, round_: int, real: bool = False) -> NetCore:
    """A core without a DHT (the view is set here); `real`: a real key (its calls to other cores are signed)."""
    c = NetCore(None, PeerConfig(run_id="trig"), identity() if real else named(name))  # type: ignore[arg-type]
    c.spec = RunSpec(target_steps=TARGET)
    c.spec_hash = c.spec.hash()
    c.round, c.training = round_, True
    return c


def record(c: NetCore) -> swarm.PeerRecord:
    return swarm.PeerRecord(c.peer_id, c.address, c.round, c.steps, 0, c.rate, True, False, c.round,
                            c.spec_hash, get_dht_time(), swarm.TRAIN)


def test_members_stop_at_what_the_leader_allows_over_grpc():
    async def body():
        cores = [core_for(n, 4, real=True) for n in ("p1", "p2", "p3")]
        servers = []
        for c in cores:
            server, port = await start_server(c, "127.0.0.1", 0)
            c.address = f"127.0.0.1:{port}"
            servers.append(server)
        for c in cores:
            c.view = {o.peer_id: record(o) for o in cores if o is not c}
        leader = min(cores, key=lambda c: leader_rank("trig", 4, c.peer_id))
        rates = dict(zip((c.peer_id for c in cores), (400.0, 200.0, 100.0), strict=True))
        tasks = [asyncio.ensure_future(c.progress_forever(4)) for c in cores]
        started = time.monotonic()
        try:
            while any(c.training for c in cores) and time.monotonic() - started < 20:
                await asyncio.sleep(0.005)
                for c in cores:
                    if not c.training:
                        continue
                    g = c.grant
                    if g is not None and not g[2] and c.steps >= g[1]:  # as Node.should_stop: ask again
                        g = await c.ask_for_steps(4, c.steps) or g
                    if g is not None and (g[2] or c.steps >= g[1]):
                        c.end_training()
                        continue
                    due = int((time.monotonic() - started) * rates[c.peer_id])
                    if c.steps < due:
                        c.set_progress(c.steps + 1, 0, rates[c.peer_id])
        finally:
            for t in tasks:
                t.cancel()
            for s in servers:
                await s.stop(None)
            for c in cores:
                await c.channels.close()
        total = sum(c.steps for c in cores)
        assert all(c.grant is not None for c in cores), "every member heard the leader"
        assert leader.rounds[4].tally is not None, "the leader counted the round"
        assert TARGET - 3 <= total <= TARGET, f"{total} steps in the round, target {TARGET}"
        assert cores[0].steps > cores[2].steps, "the faster member did more of the round"

    asyncio.run(body())


def test_a_peer_that_does_not_lead_says_so():
    async def body():
        c = core_for("solo", 2)
        other = core_for("other", 2)
        other.address = "127.0.0.1:1"
        c.address = "127.0.0.1:2"
        c.view = {"other": record(other)}
        best = min(("solo", "other"), key=lambda p: leader_rank("trig", 2, p))
        from peer._proto import peer_pb2 as pb
        reply = c.handle_progress(pb.ProgressRequest(run_id="trig", spec_hash=c.spec_hash, round=2,
                                                     peer_id="other", steps=3, rate=10.0))
        assert reply.leader == (best == "solo")

    asyncio.run(body())


def test_a_member_that_begins_after_the_target_is_filled_still_does_one_step():
    t = Tally(10)
    assert t.report("a", 10, 100.0, 0.0)[:2] == (10, True)
    allowed, stop, held = t.report("late", 0, 0.0, 0.1)
    assert (allowed, stop, held) == (1, False, 10), "its one step is granted: it joins the group with work"
    assert t.report("late", 1, 50.0, 0.2)[:2] == (1, True), "after that step it stops like everyone"
    assert t.report("a", 10, 100.0, 0.3)[:2] == (10, True), "the overrun gives no one else more steps"


def test_a_record_publishing_huge_steps_does_not_close_the_round():
    t = Tally(TARGET)
    allowed, stop, held = t.report("a", 5, 50.0, 0.0, unreported=[6.0, 1e9])
    assert not stop and held < 50, "the forged record counts at most CLAIM_CAP x the median + CLAIM_STEPS"
    assert t.report("a", 5, 50.0, 0.1, unreported=[6.0, 7.0])[2] == 5 + 6 + 7, "honest records count in full"
    assert Tally(TARGET).report("a", 100, 50.0, 0.0, unreported=[100.0])[1], "steps like the others' close it"

    async def body():   # the leader's handler, the forged record in its DHT view
        leader, honest, forger = core_for("leader", 2), core_for("honest", 2), core_for("forger", 2)
        leader.address, honest.address, forger.address = "127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"
        forger.steps = 10**9
        leader.view = {c.peer_id: record(c) for c in (honest, forger)}
        leader.steps = honest.steps = 5
        for pid in ("honest", "forger"):   # the leader is the first candidate: the others serve no address
            leader.view[pid] = dataclasses.replace(leader.view[pid], addr="")
        from peer._proto import peer_pb2 as pb
        reply = leader.handle_progress(pb.ProgressRequest(run_id="trig", spec_hash=leader.spec_hash, round=2,
                                                          peer_id="honest", steps=5, rate=10.0))
        assert reply.leader and not reply.close and reply.total_steps < TARGET, reply

    asyncio.run(body())
