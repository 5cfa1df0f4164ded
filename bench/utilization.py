"""Compute utilization: a peer's samples/s in a swarm divided by its samples/s training alone,
blocking rounds vs --overlap, for a swarm of 4 peers on loopback and, where root and tc are
there, with every link capped at --mbit (tests/links.py namespaces). Real processes. Not a test.

In the swarm a peer's rate is the samples it trained over the wall seconds of its rounds (from
the start of round 1 to the row of round n-2, averaging included), not the train-only rate of a
row. Alone is the train-only rate of --alone-procs peers that each train alone (--min-peers 1, a
run id each) at the same time: by default as many as the swarm has, so that they share the CPU
cores as the swarm's peers do and the ratio counts what the rounds cost, not the cores. On a
machine whose other load drifts between runs that ratio drifts with it, so the same peers' clean
rate (steps trained with no averaging or barrier under way, in the same run) is a second
reference. Round 0 (warm-up: connections, first steps) and the last round are left out; with
--overlap the steps a round trained ahead are counted in the round they ran in.

--accelerator-ms MS makes every inner step also wait MS milliseconds off the CPU (the test fault
plan's sleep at each inner step, and before each step trained ahead with --overlap), solo and swarm
peers alike: a peer whose steps run on an accelerator, so that the round's host work (codecs,
gRPC, digests) does not take the cores its training needs, as it does when 4 CPU-trained peers
share 2 cores. The sleep before a step trained ahead is also slept once when the round's result is
already in: at most one step's worth per round against overlap.

    .venv/bin/python bench/utilization.py [--model tiny] [--rounds 4] [--target-steps 800]
        [--codec fp32] [--mbit 100] [--links loopback capped] [--alone-procs 4] [--repeats 1]
        [--accelerator-ms 0]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.swarm.harness import Swarm  # noqa: E402


def trained(rows: list[dict], batch: int) -> tuple[float, float]:
    """(samples trained, seconds) over rounds 1 .. n-2 of one peer's rows: a round's samples
    less those it trained ahead during the round before, plus those the next round trained
    ahead during it (steps trained while a round's own start barrier waited are its own)."""
    window = zip(rows[1:-1], rows[2:], strict=True)
    samples = sum(r["samples"] + (nxt["steps_ahead"] - r["steps_ahead"]) * batch for r, nxt in window)
    # from round 1's start to round n-2's row: the gaps between rounds (writing a row) count too
    return samples, rows[-2]["time"] - (rows[1]["time"] - rows[1]["round_seconds"])


def clean_rate(rows: list[dict], batch: int) -> float:
    """The samples/s of the steps rounds 1 .. n-2 trained with nothing else of the round under way
    (phase `trained`: after the start barrier, before the hand-over; no step trained ahead): the
    same peer training alone, under the same load of the machine."""
    window = rows[1:-1]
    steps = sum(r["steps"] - r["steps_ahead"] - r.get("steps_at_barrier", 0) for r in window)
    return steps * batch / sum(r["phase_seconds"]["trained"] for r in window)


def busy_share(rows: list[dict], overlap: bool) -> float:
    """The share of rounds 1 .. n-2's seconds the training thread spent in inner steps (phase_seconds:
    training to the trigger, steps while averaging, and with --overlap the start barrier, which it
    trains through): what is left is time it waited, whatever the machine's other load."""
    window = rows[1:-1]
    busy = sum(r["phase_seconds"]["trained"] + r["phase_seconds"]["ahead"]
               + (r["phase_seconds"]["began"] if overlap else 0.0) for r in window)
    return busy / sum(r["round_seconds"] for r in window)


def train_rate(rows: list[dict]) -> float:
    """The train-only samples/s of rounds 1 .. n-2 (a row's train seconds = samples / samples_per_s)."""
    window = [r for r in rows[1:-1] if r["samples_per_s"] > 0]
    return sum(r["samples"] for r in window) / sum(r["samples"] / r["samples_per_s"] for r in window)


def phase_means(rows: dict[str, list[dict]]) -> str:
    """Mean seconds of each phase of a round on the training thread (the rows' phase_seconds), over
    rounds 1 .. n-2 of every peer."""
    window = [r["phase_seconds"] for peer in rows.values() for r in peer[1:-1] if r.get("phase_seconds")]
    if not window:
        return "no phase times"
    return "phases s: " + " ".join(f"{k} {statistics.mean(w[k] for w in window):.3f}" for k in window[0])


def open_swarm(root: Path, spec: list[str], link: str, mbit: float):
    """A started swarm (bootstrap up) on loopback, or in namespaces with every peer capped."""
    if link == "loopback":
        swarm, close = Swarm(root, spec), None
    else:
        from tests.links import NetSwarm, Topology
        topo = Topology("ut")
        swarm = NetSwarm(root, spec, topo, up_mbit=mbit, down_mbit=mbit)
        close = swarm.close
    try:
        swarm.start_bootstrap()
    except BaseException:
        (close or swarm.stop_all)()
        raise
    return swarm, close or swarm.stop_all


def accelerator_env(ms: float) -> dict[str, str]:
    """The environment that makes a peer's every inner step wait `ms` off the CPU (none for 0)."""
    if ms <= 0:
        return {}
    wait = {"action": "sleep", "seconds": ms / 1000}
    return {"DILOCO_FAULTS": json.dumps([{"point": "inner_step", **wait}, {"point": "overlap_step", **wait}])}


def run(root: Path, spec: list[str], link: str, mbit: float, peers: dict[str, list[str]], timeout_s: float,
        env: dict[str, str]) -> dict:
    """Starts `peers` (name -> extra flags) with `env`, waits for each to exit 0, returns name -> rows."""
    root.mkdir(parents=True, exist_ok=True)
    swarm, close = open_swarm(root, spec, link, mbit)
    try:
        for name, extra in peers.items():
            swarm.start_peer(name, extra, env)
        deadline = time.monotonic() + timeout_s
        for name in peers:
            try:
                rc = swarm.wait_exit(name, max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"peer {name} still running after --timeout-s {timeout_s:g}; "
                                   f"see {root / f'{name}.log'}") from None
            if rc != 0:
                raise RuntimeError(f"peer {name} exited with {rc}; see {root / f'{name}.log'}")
        return {name: swarm.metrics(name) for name in peers}
    finally:
        close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny", choices=["tiny", "small", "base"])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--peers", type=int, default=4)
    ap.add_argument("--target-steps", type=int, default=800, help="inner steps summed over the swarm per round")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--codec", default="fp32")
    ap.add_argument("--mbit", type=float, default=100.0, help="the cap of every peer's up and down link")
    ap.add_argument("--links", nargs="+", default=["loopback", "capped"], choices=["loopback", "capped"])
    ap.add_argument("--alone-procs", type=int, default=0, help="solo peers training at once for the alone "
                    "rate (0: as many as --peers)")
    ap.add_argument("--repeats", type=int, default=1, help="runs of everything, each with its own alone run")
    ap.add_argument("--accelerator-ms", type=float, default=0.0, help="every inner step also waits this many ms "
                    "off the CPU, as on an accelerator (0: CPU training only)")
    ap.add_argument("--timeout-s", type=float, default=900.0, help="the most one run may take")
    ap.add_argument("--log-dir", default="")
    args = ap.parse_args()
    if args.rounds < 3 or args.peers < 2 or args.target_steps < args.peers or args.repeats < 1 or args.accelerator_ms < 0:
        ap.error("need --rounds >= 3 (round 0 and the last are left out), --peers >= 2, --target-steps >= --peers, "
                 "--repeats >= 1, --accelerator-ms >= 0")
    links = list(args.links)
    if "capped" in links:
        from tests.links import LinksUnavailable, check_available
        try:
            check_available()
        except LinksUnavailable as e:
            print(f"capped links skipped: {e}")
            links.remove("capped")
    alone_procs = args.alone_procs or args.peers
    log_root = Path(args.log_dir or tempfile.mkdtemp(prefix="utilization-"))
    spec = ["--model", args.model, "--codec", args.codec, "--batch-size", str(args.batch_size),
            "--max-rounds", str(args.rounds), "--eval-batches", "0", "--join-window-s", "3", "--model-seed", "0"]
    print(f"utilization: model {args.model}, {args.codec}, {args.peers} peers, {args.rounds} rounds of "
          f"{args.target_steps} inner steps"
          + (f", each step also {args.accelerator_ms:g} ms off the CPU (an accelerator)" if args.accelerator_ms else "")
          + f"; alone = {alone_procs} solo peers at once; 2-core machine shared "
          f"with others: figures are noisy. Logs in {log_root}", flush=True)

    per_peer = str(max(1, args.target_steps // args.peers))
    env = accelerator_env(args.accelerator_ms)
    table: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    for rep in range(args.repeats):   # each repeat measures its own alone rate first: the load drifts
        solo = run(log_root / f"alone-{rep}", [*spec, "--min-peers", "1", "--target-steps", per_peer], "loopback",
                   args.mbit, {f"a{i}": ["--run-id", f"alone-{rep}-{i}", "--seed", str(i)] for i in range(alone_procs)},
                   args.timeout_s, env)
        # alone: the train-only rate (samples / train seconds, train seconds = samples / samples_per_s)
        alone = statistics.mean(train_rate(rows) for rows in solo.values())
        print(f"  #{rep} alone: {alone:.0f} samples/s per peer", flush=True)
        for link in links:
            for mode in ("blocking", "overlap"):
                extra = ["--overlap"] if mode == "overlap" else []
                rows = run(log_root / f"{link}-{mode}-{rep}", [*spec, "--min-peers", str(args.peers), "--target-steps",
                                                               str(args.target_steps), "--run-id", f"ut-{link}-{mode}"],
                           link, args.mbit, {f"p{i}": ["--seed", str(i), *extra] for i in range(args.peers)},
                           args.timeout_s, env)
                rates = [s / t for s, t in (trained(r, args.batch_size) for r in rows.values())]
                avg = statistics.mean(r["average_seconds"] for peer in rows.values() for r in peer[1:-1])
                rate = statistics.mean(rates)
                own = statistics.mean(s / t / clean_rate(r, args.batch_size) for (s, t), r in
                                      ((trained(r, args.batch_size), r) for r in rows.values()))
                busy = statistics.mean(busy_share(r, mode == "overlap") for r in rows.values())
                where = "loopback" if link == "loopback" else f"{args.mbit:g} Mbit/s"
                table.setdefault((mode, where), []).append((rate / alone, own, busy, avg))
                print(f"  #{rep} {link} {mode}: {rate:.0f} samples/s per peer (peers {min(rates):.0f}-"
                      f"{max(rates):.0f}), utilization {rate / alone:.3f}, of clean train rate {own:.3f}, busy {busy:.3f}; "
                      f"{phase_means(rows)}", flush=True)
    print(f"\nutilization = swarm /s over alone /s (each repeat's own alone run); 'of clean train rate': swarm "
          f"/s over the rate of the same peers' steps trained with no averaging or barrier under way, in the same "
          f"run (other load on the machine moves both alike; steps slowed by averaging work count as a loss); "
          f"'thread busy': the share of the rounds' seconds the training thread spent in inner steps; "
          f"mean of {args.repeats} repeat(s) (min-max)")
    print(f"{'mode':9} {'link':12} {'utilization':>19} {'of clean train rate':>19} {'thread busy':>19} "
          f"{'average s':>9}")
    for (mode, link), runs in table.items():
        cols = [[x[i] for x in runs] for i in range(4)]
        print(f"{mode:9} {link:12} " + " ".join(f"{statistics.mean(c):6.3f} ({min(c):.3f}-{max(c):.3f})"
                                                for c in cols[:3]) + f" {statistics.mean(cols[3]):9.2f}")

if __name__ == "__main__":
    main()
