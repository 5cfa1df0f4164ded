"""How close rounds close to their target: N peers of a preset on 127.0.0.1, each round's
summed inner steps over the swarm against --target-steps. Prints per-round sums and the
ratio's median and range. Not a test.

    .venv/bin/python bench/trigger.py [--peers 3] [--model tiny] [--target-steps 150] [--rounds 8]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.swarm.harness import Swarm  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--peers", type=int, default=3)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--target-steps", type=int, default=150)
    ap.add_argument("--rounds", type=int, default=8)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="trigger-"))
    run = ["--model", args.model, "--codec", "int8", "--target-steps", str(args.target_steps),
           "--min-peers", str(args.peers), "--batch-size", "4", "--eval-batches", "1", "--run-id", "trigger",
           "--max-rounds", str(args.rounds)]
    swarm = Swarm(root, run)
    names = [f"p{i}" for i in range(args.peers)]
    try:
        swarm.start_bootstrap()
        for name in names:
            swarm.start_peer(name)
        for name in names:
            swarm.wait_rounds(name, args.rounds, 60 + 60 * args.rounds)
    finally:
        swarm.stop_all()
    ratios = []
    for r in range(args.rounds):
        rows = [swarm.by_round(n).get(r) for n in names]
        steps = [row["steps"] for row in rows if row and row["outcome"] == "applied"]
        ratios.append(sum(steps) / args.target_steps)
        print(f"round {r}: {sum(steps)} steps over {len(steps)} peers ({', '.join(map(str, steps))}), "
              f"{ratios[-1]:.2f} x the target")
    print(f"{args.model}, {args.peers} peers, target {args.target_steps}: steps / target median "
          f"{statistics.median(ratios):.2f}, range {min(ratios):.2f}-{max(ratios):.2f} (logs in {root})")


if __name__ == "__main__":
    main()
