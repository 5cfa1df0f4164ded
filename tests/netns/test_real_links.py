"""Peers on real, rate-capped links (tests/links.py: one network namespace per host, tbf caps
each way), where a state download takes longer than a round's training.

Main swarm: 4 peers at 100 Mbit/s each way, the `small` preset (3.3 M parameters: 26 MB of
theta + momentum) with `--target-steps 8`. One download of the state takes at least 2.1 s at
12.5 MB/s, and about 6 s when the three starting peers pull it from the genesis peer's one uplink
at once; a round's training is 8 inner steps summed over the swarm, 2 steps a peer of about 0.27 s
(0.55 s with 4 peers on 2 cores), so a download takes 4 to 12 rounds' worth of training. Measured
on this 2-core machine: 26 MB in 2.7 to 7 s; whole rounds (averaging, digests, eval) of 2.5-5 s,
8-10 s while other test runs share the cores. (a) With `--min-peers 4` no peer may begin round 0
before all four hold the state (its metrics row's time - round_seconds against the others'
`downloaded the state` log lines), and rounds 0-5 must each have all four. (b) A newcomer at
100 Mbit/s contributes to a group within 4 rounds of the swarm after it got the state.

Slow swarm (c): 2 peers of the `tiny` preset with `--codec fp32` (0.96 MB of state; the averaged
update is half of it, 0.48 MB), rounds of 1-3 s, then a newcomer on a 0.5 Mbit/s link each way:
one round's update takes at least 7.7 s to reach it (measured: more, the DHT shares the link; its
0.96 MB state took 25-30 s), three rounds or more. It must say once that it cannot keep up, with
its numbers.

(d) In every test no state round may have two digests across the peers' metrics.
"""

from __future__ import annotations

import re
import time
from datetime import datetime

import pytest

from tests.links import LinksUnavailable, NetSwarm, Topology
from tests.procs import log_tail, wait_for_line

pytestmark = pytest.mark.timeout(300)

MAIN = ["--model", "small", "--target-steps", "8", "--min-peers", "4", "--batch-size", "4",
        "--eval-batches", "1", "--run-id", "links-main"]
FIRST = ("a", "b", "c", "d")
ROUNDS = 6                     # rounds 0..5 with all four
READY_SLACK_S = 0.5            # a round's start (metrics time - round_seconds) vs a log line's time stamp
NEWCOMER_ROUNDS = 4            # the most swarm rounds from holding the state to contributing
SLOW = ["--model", "tiny", "--codec", "fp32", "--target-steps", "40", "--min-peers", "2", "--batch-size", "4",
        "--eval-batches", "1", "--run-id", "links-slow"]
SLOW_MBIT = 0.5
SLOW_LINE_S = 120              # from the slow newcomer's start to its "cannot keep up" line
DOWNLOADED = r"^(\S+ \S+) \S+ peer\.net\.state_sync: downloaded the state of round (\d+): .*$"
STORY = re.compile(r"round 0 starts|downloaded the state|starting although|excluded|catching up|"
                   r"caught up|cannot keep up|applied, 1 peers|closing the group without|failed")


def log_time(stamp: str) -> float:
    """The epoch time of a log line's asctime (`2026-12-01 21:57:28,315`, local time)."""
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def first_download(swarm: NetSwarm, name: str) -> float | None:
    """When `name` first held a downloaded state (its log line), None if it never downloaded one."""
    m = re.search(DOWNLOADED, swarm.log(name), re.MULTILINE)
    return log_time(m.group(1)) if m else None


def story(swarm: NetSwarm, names, max_lines: int = 25) -> str:
    """The lines of each peer's log that tell how it got into rounds (or did not)."""
    parts = []
    for name in names:
        lines = [line[:240] for line in swarm.log(name).splitlines() if STORY.search(line)]
        parts.append(f"--- {name}:\n" + "\n".join(lines[:max_lines]))
    return "\n".join(parts)


def started_swarm(tmp_path_factory, label: str, run: list[str], names) -> NetSwarm:
    try:
        topo = Topology()
    except LinksUnavailable as e:
        pytest.skip(f"no network namespaces here: {e}")
    swarm = NetSwarm(tmp_path_factory.mktemp(label), run, topo)
    try:
        swarm.start_bootstrap()
        for name in names:  # all at once: none waits for another to be up
            swarm.start_peer(name)
    except BaseException:
        swarm.close()
        raise
    return swarm


@pytest.fixture(scope="class")
def main_swarm(tmp_path_factory):  # class scope: gone before the slow swarm starts (2 cores)
    swarm = started_swarm(tmp_path_factory, "links-main", MAIN, FIRST)
    try:
        yield swarm
    finally:
        swarm.close()


@pytest.fixture(scope="module")
def slow_swarm(tmp_path_factory):
    swarm = started_swarm(tmp_path_factory, "links-slow", SLOW, ("a", "b"))
    try:
        yield swarm
    finally:
        swarm.close()


def split_problems(swarm: NetSwarm, names) -> list[str]:
    return [f"state round {r} has {len(d)} digests: {', '.join(x[:12] for x in sorted(d))}"
            for r, d in sorted(swarm.split_states(names).items())]


class TestMainSwarm:
    """(a), (b): the 4-peer `small` swarm at 100 Mbit/s, shared by both tests."""

    def test_four_peers_start_round_0_together_and_stay_together(self, main_swarm):
        deadline = time.monotonic() + 150
        rows = {name: main_swarm.wait_rounds(name, ROUNDS, max(1.0, deadline - time.monotonic()))
                for name in FIRST}
        problems = []
        # together: nobody begins round 0 before the last of them holds the state (only ready peers count)
        ready = {name: first_download(main_swarm, name) for name in FIRST}
        last_ready = max((t for t in ready.values() if t is not None), default=0.0)
        for name, rs in rows.items():
            if rs[0]["round"] != 0:
                problems.append(f"{name}: its first round is {rs[0]['round']}, not 0")
                continue
            began = rs[0]["time"] - rs[0]["round_seconds"]
            if began < last_ready - READY_SLACK_S:
                problems.append(f"{name} began round 0 {last_ready - began:.1f} s before the last peer held the "
                                f"state ({'created it' if ready[name] is None else 'downloaded it'}; "
                                f"{rs[0]['steps']} of round 0's steps)")
            for r in rs[:ROUNDS]:
                if r["outcome"] != "applied" or r["group_size"] != 4 or len(r["contributors"]) != 4:
                    problems.append(f"{name} round {r['round']}: {r['outcome']}, group of {r['group_size']}, "
                                    f"{len(r['contributors'])} contributors, {r['steps']} steps")
        problems += split_problems(main_swarm, FIRST)
        assert not problems, "\n".join(problems) + "\n" + story(main_swarm, FIRST)

    def test_newcomer_at_100_mbit_gets_into_a_group_within_a_few_rounds(self, main_swarm):
        proc = main_swarm.start_peer("newcomer")
        started = time.time()
        got = wait_for_line(proc, DOWNLOADED, 120)
        got_at, got_round = log_time(got.group(1)), int(got.group(2))
        deadline = time.monotonic() + 120
        while True:
            mine = [r for r in main_swarm.metrics("newcomer") if r["outcome"] == "applied" and r["group_size"] >= 2
                    and r["peer_id"] in r["contributors"]]
            if mine:
                first = mine[0]
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                state = f"exited {proc.returncode}" if proc.poll() is not None else "120 s after it got the state"
                pytest.fail(f"the newcomer contributed to no group ({state}); its rounds: "
                            f"{[(r['round'], r['outcome'], r['group_size']) for r in main_swarm.metrics('newcomer')]}\n"
                            f"{story(main_swarm, ('newcomer',))}\n{log_tail(proc.log_path, 30)}")
            time.sleep(0.2)
        # swarm rounds that ended after the newcomer held the state, up to the one it contributed to
        a_rows = main_swarm.metrics("a")
        waited = [r["round"] for r in a_rows if r["time"] > got_at and r["round"] <= first["round"]]
        problems = split_problems(main_swarm, (*FIRST, "newcomer"))
        if len(waited) > NEWCOMER_ROUNDS:
            problems.append(f"the newcomer got the state of round {got_round} {got_at - started:.1f} s after its "
                            f"start and first contributed in round {first['round']}: {len(waited)} rounds of the "
                            f"swarm later (at most {NEWCOMER_ROUNDS})")
        assert not problems, "\n".join(problems) + "\n" + story(main_swarm, ("newcomer", "a"))


def test_newcomer_on_a_slow_link_says_it_cannot_keep_up(slow_swarm):
    slow_swarm.wait_rounds("a", 3, 120)   # a running swarm, rounds of 1.5-2.5 s
    proc = slow_swarm.start_peer("slow", up_mbit=SLOW_MBIT, down_mbit=SLOW_MBIT)
    rows_at_start = len(slow_swarm.metrics("a"))
    try:
        match = wait_for_line(proc, r"^.*cannot keep up.*$", SLOW_LINE_S)
    except AssertionError as e:
        a_rows = slow_swarm.metrics("a")[rows_at_start:]
        secs = [r["round_seconds"] for r in a_rows]
        raise AssertionError(
            f"{str(e).splitlines()[0]}\nthe swarm did {len(a_rows)} rounds meanwhile ({min(secs, default=0):.1f}-"
            f"{max(secs, default=0):.1f} s each); the slow peer's rounds: "
            f"{[(r['round'], r['outcome'], round(r['round_seconds'], 1)) for r in slow_swarm.metrics('slow')]}\n"
            f"{story(slow_swarm, ('slow',))}\n--- its log's tail:\n{log_tail(proc.log_path, 15)}") from None
    text = match.group(0).split(": ", 1)[-1]   # the message, past the time stamp and logger
    assert len(re.findall(r"\d+(?:\.\d+)?", text)) >= 3, f"rate, update size and round time expected: {text}"
    seen = len(slow_swarm.metrics("a"))
    slow_swarm.wait_rounds("a", seen + 3, 60)   # then it must not say it again every round
    said = [line for line in slow_swarm.log("slow").splitlines() if "cannot keep up" in line]
    problems = split_problems(slow_swarm, ("a", "b", "slow"))
    if len(said) != 1:
        problems.append(f"said {len(said)} times that it cannot keep up, expected once:\n" + "\n".join(said[:5]))
    assert not problems, "\n".join(problems)
