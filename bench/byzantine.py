"""Eval loss with a lying peer: 5 peers of the built-in task on 127.0.0.1 (bench/local_swarm.py), one
of which sends a scaled (x100) or sign-flipped pseudo-gradient every round (the test-only fault
plan's `scale` fault at `pseudo_gradient`), or lies as an owner (serves 100 x every shard it
reduces: `scale` at `reduced_shard`), under each --aggregator, beside an honest run with the
mean. A robust aggregator turns --verify-shards on (auto), which is what catches the lying owner. Prints the eval loss at the start and after the last round, and the rounds applied. Weights
are equal (--weighting equal): a robust aggregator drops or clips by weight share, so a liar could
otherwise claim more weight (see ARCHITECTURE.md section 8). Not a test.

    .venv/bin/python bench/byzantine.py [--rounds 6] [--target-steps 40] [--attacks scale flip owner]
        [--aggregators mean trimmed-mean centered-clip] [--honest-all] [--skip-honest]

The liar is the last peer, p4; p0 (honest) is the one whose eval loss is read (the global state is
the same bytes on every peer).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from local_swarm import LocalSwarm  # noqa: E402

START_EVAL = re.compile(r"eval loss at the start: ([0-9.]+)")
# attack -> (what the liar does, its fault plan)
ATTACKS = {
    "scale": ("sends 100 x its delta", [{"point": "pseudo_gradient", "action": "scale", "factor": 100.0}]),
    "flip": ("sends -1 x its delta", [{"point": "pseudo_gradient", "action": "scale", "factor": -1.0}]),
    "owner": ("serves 100 x the shards it owns", [{"point": "reduced_shard", "action": "scale", "factor": 100.0}]),
}
AGGREGATORS = ("mean", "trimmed-mean", "centered-clip")


@dataclass
class Result:
    name: str
    start: float
    final: float          # nan when p0 wrote no finite eval loss
    rounds: int           # rounds applied by p0
    aborted: int          # attempts p0 saw aborted (a lying owner caught by --verify-shards)
    wall_s: float
    note: str = ""


def slug(name: str) -> str:
    return re.sub(r"\W+", "-", name)


def run(root: Path, name: str, aggregator: str, attack: str, args: argparse.Namespace) -> Result:
    spec = ["--model", args.model, "--codec", args.codec, "--weighting", "equal", "--aggregator", aggregator,
            "--target-steps", str(args.target_steps), "--min-peers", str(args.peers),
            "--max-rounds", str(args.rounds), "--batch-size", str(args.batch_size),
            "--eval-batches", str(args.eval_batches), "--join-window-s", "3", "--model-seed", "0",
            "--run-id", slug(name),   # one round of warmup (the default's 20k samples would hide any update)
            "--warmup-samples", str(args.target_steps * args.batch_size),
            "--total-samples", str(max(1, args.rounds) * args.target_steps * args.batch_size)]
    liar_env = {"DILOCO_FAULTS": json.dumps(ATTACKS[attack][1])} if attack else {}
    t0, note = time.monotonic(), ""
    with LocalSwarm(root) as swarm:
        procs = [swarm.peer(f"p{i}", [*spec, "--seed", str(i)], liar_env if i == args.peers - 1 else {})
                 for i in range(args.peers)]
        deadline = time.monotonic() + args.timeout_s
        for i, p in enumerate(procs):
            try:
                rc = p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                note = note or f"p{i} still running after {args.timeout_s:g} s"
                continue
            if rc != 0:
                note = note or f"p{i} exited {rc} (see {root / f'p{i}.log'})"
        rows = swarm.metrics("p0") if (root / "p0.jsonl").exists() else []
    m = START_EVAL.search((root / "p0.log").read_text())
    evals = [float(r["eval_loss"]) for r in rows if isinstance(r["eval_loss"], (int, float))]
    final = evals[-1] if evals and math.isfinite(evals[-1]) else float("nan")
    return Result(name, float(m.group(1)) if m else float("nan"), final,
                  sum(r["outcome"] == "applied" for r in rows), sum(r["outcome"] == "aborted" for r in rows),
                  time.monotonic() - t0, note)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny", choices=["tiny", "small"])
    ap.add_argument("--codec", default="int8")
    ap.add_argument("--peers", type=int, default=5, help="peers in the swarm, the last of which lies")
    ap.add_argument("--rounds", type=int, default=6, help="rounds per run (a run's start costs ~50 s of the "
                    "~70 s it takes on 2 cores: 7 runs by default)")
    ap.add_argument("--target-steps", type=int, default=40, help="inner steps summed over the swarm per round")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--eval-batches", type=int, default=8)
    ap.add_argument("--attacks", nargs="*", default=["scale", "flip", "owner"], choices=sorted(ATTACKS))
    ap.add_argument("--aggregators", nargs="+", default=list(AGGREGATORS), choices=AGGREGATORS)
    ap.add_argument("--honest-all", action="store_true", help="an honest run under every aggregator, not just "
                    "the mean (what robustness costs without a liar)")
    ap.add_argument("--skip-honest", action="store_true", help="no honest run (when splitting the table over "
                    "several invocations)")
    ap.add_argument("--timeout-s", type=float, default=300.0, help="the most one run may take")
    ap.add_argument("--log-dir", default="", help="keep each run's logs and metrics here (default: a temp folder)")
    args = ap.parse_args()
    if args.peers < 3 or args.rounds < 1 or args.target_steps < args.peers:
        ap.error("need --peers >= 3 (a robust aggregator needs 3 contributions), --rounds >= 1 and "
                 "--target-steps >= --peers")
    runs = [] if args.skip_honest else [(f"honest, {a}", a, "") for a in (args.aggregators if args.honest_all
                                                                          else ["mean"])]
    runs += [(f"{attack}, {a}", a, attack) for attack in args.attacks for a in args.aggregators]
    log_root = Path(args.log_dir or tempfile.mkdtemp(prefix="byzantine-"))
    liar = "; ".join(f"{k} {ATTACKS[k][0]}" for k in args.attacks) or "none (honest runs only)"
    print(f"{args.peers} peers, model {args.model}, codec {args.codec}, {args.rounds} rounds of "
          f"{args.target_steps} inner steps x batch {args.batch_size}, --weighting equal, loopback; "
          f"liar p{args.peers - 1}: {liar}. Logs in {log_root}", flush=True)
    results = []
    for name, aggregator, attack in runs:
        root = log_root / slug(name)
        root.mkdir(parents=True, exist_ok=True)
        results.append(run(root, name, aggregator, attack, args))
        r = results[-1]
        print(f"  {name}: eval {r.final:.4f} after {r.rounds} rounds ({r.wall_s:.0f} s) {r.note}", flush=True)
    print(f"\n{'run (attack, aggregator)':28} {'start':>7} {'eval loss':>9} {'rounds':>6} {'aborted':>7} "
          f"{'wall s':>7}  note")
    for r in results:
        print(f"{r.name:28} {r.start:7.4f} {r.final:9.4f} {r.rounds:6d} {r.aborted:7d} {r.wall_s:7.1f}  {r.note}")


if __name__ == "__main__":
    main()
