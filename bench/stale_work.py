"""Effect of --stale-work (drop vs carry) on the eval loss: 3 peers of the tiny model, one of
which misses every other round (it sleeps before joining, from a test fault plan), for a fixed
number of rounds; prints the eval loss the swarm reaches with each setting. Not a test.

    .venv/bin/python bench/stale_work.py [--rounds 12] [--repeats 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from local_swarm import LocalSwarm  # noqa: E402

# the late peer arrives after the group closed in every other round (even rounds)
LATE = json.dumps([{"point": "before_average", "action": "sleep", "seconds": 3.5, "round": r} for r in range(0, 60, 2)])


def run(root: Path, mode: str, rounds: int, seed: int) -> dict:
    spec = ["--model", "tiny", "--codec", "int8", "--target-steps", "120", "--min-peers", "3",
            "--join-window-s", "1.5", "--stale-work", mode, "--batch-size", "4", "--eval-batches", "16",
            "--run-id", f"stale-{mode}", "--model-seed", str(seed)]
    with LocalSwarm(root) as swarm:
        procs = [swarm.peer(f"p{i}", [*spec, "--seed", str(seed + i), "--max-rounds", str(rounds if i < 2 else rounds + 5)],
                            {"DILOCO_FAULTS": LATE} if i == 2 else {}) for i in range(3)]
        for p in procs[:2]:
            p.wait(timeout=1800)
        late = swarm.metrics("p2")
        return {"eval": swarm.metrics("p0")[-1]["eval_loss"], "missed": sum(r["outcome"] == "excluded" for r in late),
                "late_rounds": len(late), "carried": (root / "p2.log").read_text().count("carrying")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    print(f"3 peers (tiny, int8), one misses rounds; eval loss after {args.rounds} rounds")
    for mode in ("drop", "carry"):
        results = []
        for rep in range(args.repeats):
            with tempfile.TemporaryDirectory() as tmp:
                results.append(run(Path(tmp), mode, args.rounds, seed=rep))
        evals = [r["eval"] for r in results]
        print(f"{mode:5}: eval loss {statistics.mean(evals):.4f} (runs: {', '.join(f'{e:.4f}' for e in evals)}); "
              f"late peer missed {sum(r['missed'] for r in results)} of {sum(r['late_rounds'] for r in results)} "
              f"rounds, carried {sum(r['carried'] for r in results)} times")


if __name__ == "__main__":
    main()
