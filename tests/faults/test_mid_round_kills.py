"""Peers killed (SIGKILL, from a fault plan keyed by point) at each point of a round: the
survivors never hang, end every round the same way (all apply or all abort), keep equal
digests and go on training; nothing of the dead peer keeps running."""

from __future__ import annotations

import json
import re
import time

import pytest

from tests.procs import assert_no_orphans, descendants
from tests.swarm.harness import Swarm

RUN = ["--model", "tiny", "--codec", "int8", "--target-steps", "120", "--max-round-seconds", "30",
       "--min-peers", "3", "--batch-size", "4", "--eval-batches", "1", "--join-window-s", "4",
       "--run-id", "faults"]
STABLE = ("a", "b", "c")
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    s = Swarm(tmp_path_factory.mktemp("faults"), RUN)
    try:
        s.start_bootstrap()
        for name in STABLE:
            s.start_peer(name)
        s.wait_rounds("a", 1, 120)
        yield s
        s.assert_one_digest_per_round()
    finally:
        s.stop_all()


def run_victim(swarm: Swarm, point: str, timeout_s: float) -> tuple[int, str, bool]:
    """Starts a peer that kills itself at `point`; waits for its death, then for its orphans.
    Returns the round it died in, its peer id and whether it led that round."""
    name = f"victim-{point}"
    proc = swarm.start_peer(name, env={"DILOCO_FAULTS": json.dumps([{"point": point, "action": "kill"}])})
    seen, deadline = {}, time.monotonic() + timeout_s
    while proc.poll() is None:
        for child in descendants(proc.pid):
            seen[child.pid] = child
        assert time.monotonic() < deadline, f"{name} never reached {point}:\n{swarm.log(name)[-3000:]}"
        time.sleep(0.1)
    assert proc.returncode == -9, f"{name} exited {proc.returncode}:\n{swarm.log(name)[-3000:]}"
    assert seen, "the victim's DHT child and p2pd should have been seen"
    assert_no_orphans(list(seen.values()), 10)
    log = swarm.log(name)
    died_in = int(re.search(rf"kill to myself at {point} of round (\d+)", log).group(1))
    victim_id = re.search(r"Join through: \S+/p2p/(\S+)", log).group(1)
    for n in STABLE:
        swarm.wait_round(n, died_in, 60)
    # led any attempt at the round: an attempt it led aborts and is trained again under the same number
    led = any(r["leader"] == victim_id for n in STABLE for r in swarm.metrics(n) if r["round"] == died_in)
    return died_in, victim_id, led


@pytest.mark.parametrize("point, timeout_s", [
    ("after_join", 90), ("after_send", 90), ("serving_shard", 90), ("leader_commit", 200)])
def test_kill_mid_round(swarm, point, timeout_s):
    died_in, victim_id, led = run_victim(swarm, point, timeout_s)
    killed_at = time.time()
    if not led:  # a dead member costs only its own lost part: the round applies for the others
        rows = [swarm.wait_round(n, died_in, 60) for n in STABLE]
        assert [r["outcome"] for r in rows] == ["applied"] * 3, [(r["outcome"], r["group_size"]) for r in rows]
        assert len({r["digest"] for r in rows}) == 1
        assert all(set(r["dropped"]) <= {victim_id} and r["contributors"] == rows[0]["contributors"] for r in rows)
        if victim_id in rows[0]["dropped"]:  # in their group, its part lost: its shard was redone
            assert any(re.search(f"round {died_in}: shard \\d+ (served again by|.*reduces it again)",
                                 swarm.log(n)) for n in STABLE)
            # why, as each survivor saw it: a dead peer sent no report, so no later reason applies
            reasons = [r["drop_reasons"][victim_id] for r in rows]
            assert set(reasons) <= {"unreachable", "reported_unreachable", "no_report"}, reasons
            assert all(re.search(rf"round {died_in}: applied, .*; dropped {victim_id[-6:]} \({why}\)$",
                                 swarm.log(n), re.M) for n, why in zip(STABLE, reasons, strict=True))
    done = {n: len(swarm.metrics(n)) for n in STABLE}
    for n in STABLE:
        swarm.wait_rounds(n, done[n] + 2, 120)
    rows = {n: swarm.by_round(n) for n in STABLE}
    common = sorted(set.intersection(*(set(r) for r in rows.values())))
    assert not swarm.split_states(STABLE), f"peers hold different states after a kill at {point}"
    for r in common:  # members end a round the same way: all apply or all abort (a late one catches up)
        outcomes = {rows[n][r]["outcome"] for n in STABLE if rows[n][r]["outcome"] != "excluded"}
        assert len(outcomes) <= 1, f"round {r}: {outcomes} after a kill at {point}"
        assert all(rows[n][r]["divergences"] == 0 for n in STABLE)
    after = [rows["a"][r] for r in common if rows["a"][r]["time"] > killed_at]
    assert after and after[-1]["outcome"] == "applied" and after[-1]["group_size"] == 3
    slowest = max(rows[n][r]["round_seconds"] for n in STABLE for r in common)
    print(f"kill at {point}: slowest round {slowest:.1f} s; outcomes after: {[x['outcome'] for x in after]}")
    assert slowest < 90


def test_owner_dead_after_serving_some_members_round_still_applies(swarm):
    """An owner that dies after serving its shard to two members: the third gets the same
    bytes from one of them, and the round applies everywhere. (If the victim happened to
    lead that round, no decision can come; a new victim is started.)"""
    plan = [{"point": "served_shard", "action": "kill", "skip": 1}]
    for attempt in range(6):   # each victim leads its round with odds about 1/4: six all leading is 1 in 4096
        name = f"half-server-{attempt}"
        proc = swarm.start_peer(name, env={"DILOCO_FAULTS": json.dumps(plan)})
        assert proc.wait(timeout=120) == -9, swarm.log(name)[-3000:]
        died_in = int(re.search(r"kill to myself at served_shard of round (\d+)", swarm.log(name)).group(1))
        rows = [swarm.wait_round(n, died_in, 60) for n in STABLE]
        victim_id = re.search(r"Join through: \S+/p2p/(\S+)", swarm.log(name)).group(1)
        if not any(f"no decision from leader {victim_id[-6:]}" in swarm.log(n) for n in STABLE):
            break
    assert {r["outcome"] for r in rows} == {"applied"}, [(r["outcome"], r["group_size"]) for r in rows]
    assert len({r["digest"] for r in rows}) == 1
    assert any("served again by" in swarm.log(n) for n in STABLE)


def test_loss_still_falls(swarm):
    rows = swarm.metrics("a")
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"] - 0.3


def _next_leader(swarm: Swarm, round_: int, peers: dict[str, str]) -> str:
    from peer.net.round import leader_rank

    return min(peers, key=lambda n: leader_rank("faults", round_, peers[n]))


@pytest.mark.parametrize("role", ["member", "leader"])
def test_stopped_peer_is_dropped_then_catches_up(swarm, role):
    """SIGSTOP a member (or the next round's leader) for two rounds: the others drop it at the
    deadline and go on; after SIGCONT it catches up and takes part again by itself."""
    import os
    import signal

    ids = {n: swarm.metrics(n)[-1]["peer_id"] for n in STABLE}
    last = max(swarm.metrics("a")[-1]["round"], swarm.metrics("b")[-1]["round"])
    victim = _next_leader(swarm, last + 2, ids) if role == "leader" else "c"
    others = [n for n in STABLE if n != victim]
    if role == "leader":  # stop it while it trains the round it would lead
        swarm.wait_round(others[0], last + 1, 60)
    pid = swarm.procs[victim].pid
    os.kill(pid, signal.SIGSTOP)
    stopped_at = time.time()
    try:
        done = len(swarm.metrics(others[0]))
        swarm.wait_rounds(others[0], done + 2, 120)
        during = [r for r in swarm.metrics(others[0]) if r["time"] > stopped_at]  # before it wakes up
    finally:
        os.kill(pid, signal.SIGCONT)
    assert [r["group_size"] for r in during if r["outcome"] == "applied"][-1] == 2
    slowest = max(r["round_seconds"] for r in during)
    print(f"{role} stopped: rounds during {[(r['outcome'], r['group_size'], round(r['round_seconds'], 1)) for r in during]}")
    assert slowest < 60
    woke = time.time()
    deadline = time.monotonic() + 120
    while True:  # it takes part again: a round applied by all three with one digest
        rows = {n: swarm.by_round(n) for n in STABLE}
        back = [r for r, row in rows[victim].items() if row["time"] > woke and row["outcome"] == "applied"
                and all(r in rows[n] and rows[n][r]["digest"] == row["digest"] for n in others)
                and row["group_size"] == 3]
        if back:
            break
        assert time.monotonic() < deadline, f"{victim} did not rejoin:\n{swarm.log(victim)[-3000:]}"
        time.sleep(0.5)
    # a few rounds behind, it replays the kept updates instead of downloading the state
    assert re.search(r"caught up to round \d+ by replaying the updates", swarm.log(victim)), swarm.log(victim)[-3000:]


def test_sigterm_mid_round_serves_owned_shards_first(swarm):
    """A peer told to stop (SIGTERM) right after sending its shards still serves the shard
    it owns, so the round applies for everyone, and exits 0."""
    name = "leaver"
    proc = swarm.start_peer(name, env={"DILOCO_FAULTS": json.dumps([{"point": "after_send", "action": "sigterm"}])})
    assert proc.wait(timeout=120) == 0, swarm.log(name)[-3000:]
    log = swarm.log(name)
    assert "Traceback" not in log
    left_in = int(re.search(r"sigterm to myself at after_send of round (\d+)", log).group(1))
    rows = [swarm.wait_round(n, left_in, 60) for n in STABLE]
    assert {r["outcome"] for r in rows} == {"applied"}, rows
    assert {r["group_size"] for r in rows} == {4} and len({r["digest"] for r in rows}) == 1
    assert all(r["total_weight"] > sum(x["weight"] for x in rows) for r in rows), "the leaver's work counts"


def test_donor_killed_while_serving_state(swarm):
    """A donor killed (SIGKILL) while it streams the state to a newcomer: the newcomer does not
    hang and gets the state from another donor. The stable peers are stopped meanwhile, so the
    doomed donor is the only live one the newcomer can pick; they wake up after its death."""
    import os
    import signal

    from peer.net.swarm import FRESH_S

    donor = swarm.start_peer("donor", env={"DILOCO_FAULTS": json.dumps([{"point": "serving_state", "action": "kill"}])})
    swarm.wait_rounds("donor", 1, 90)
    pids = [swarm.procs[n].pid for n in STABLE]
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(FRESH_S + 2)  # their records go stale: the newcomer sees one live donor
        swarm.start_peer("newcomer")
        assert donor.wait(timeout=60) == -9, swarm.log("donor")[-3000:]
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    assert "kill to myself at serving_state" in swarm.log("donor")
    swarm.forget("donor")  # it trained alone while the others were stopped; those rounds died with it
    first = swarm.wait_rounds("newcomer", 2, 150)[-1]
    log = swarm.log("newcomer")
    assert re.search(r"state download from \S+ at \S+ failed after \d+ bytes", log), log[-3000:]
    deadline = time.monotonic() + 60   # a's row of the same state (rows of a round kept and retried differ)
    while not (theirs := [r for r in swarm.metrics("a") if r["state_round"] == first["state_round"]]):
        assert time.monotonic() < deadline, f"a never held the state of round {first['state_round']}"
        time.sleep(0.2)
    assert first["digest"] == theirs[0]["digest"]
    assert not swarm.split_states(STABLE + ("newcomer",))
    assert "Traceback" not in log
