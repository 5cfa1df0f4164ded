"""Seconds per round and bytes per peer per round for a local swarm of 3 peers (bootstrap
node + peers on 127.0.0.1), once per codec. Prints a table; not a test.

    .venv/bin/python bench/round_cost.py [--model small] [--rounds 4] [--codecs fp32 int8]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from local_swarm import LocalSwarm  # noqa: E402


def run_swarm(root: Path, codec: str, model: str, rounds: int, peers: int, target: int) -> list[list[dict]]:
    run = ["--model", model, "--codec", codec, "--target-steps", str(target), "--min-peers", str(peers),
           "--max-rounds", str(rounds), "--eval-batches", "1", "--batch-size", "4", "--run-id", f"bench-{codec}"]
    with LocalSwarm(root) as swarm:
        procs = [swarm.peer(f"p{i}", run) for i in range(peers)]
        for p in procs:
            p.wait(timeout=1800)
        return [swarm.metrics(f"p{i}") for i in range(peers)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="small")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--peers", type=int, default=3)
    ap.add_argument("--target-steps", type=int, default=60)
    ap.add_argument("--codecs", nargs="+", default=["fp32", "int8"])
    args = ap.parse_args()
    print(f"{args.peers} peers, model {args.model}, {args.rounds} rounds, loopback, 2-core machine shared")
    print(f"{'codec':6} {'round s':>8} {'average s':>10} {'sent MB/peer':>13} {'recv MB/peer':>13} {'bound MB':>9}")
    for codec in args.codecs:
        with tempfile.TemporaryDirectory() as tmp:
            rows = [r for peer in run_swarm(Path(tmp), codec, args.model, args.rounds, args.peers,
                                            args.target_steps) for r in peer[1:]]  # round 0 includes warm-up
        sent = statistics.mean(r["bytes_sent"] for r in rows) / 1e6
        recv = statistics.mean(r["bytes_received"] for r in rows) / 1e6
        numel = {"tiny": 120_576, "small": 3_257_856, "base": 14_393_088}[args.model]
        per_value = 4 if codec == "fp32" else 1 + 4 / 256
        bound = 2 * (args.peers - 1) / args.peers * numel * per_value / 1e6
        print(f"{codec:6} {statistics.mean(r['round_seconds'] for r in rows):8.2f} "
              f"{statistics.mean(r['average_seconds'] for r in rows):10.2f} {sent:13.2f} {recv:13.2f} {bound:9.2f}")


if __name__ == "__main__":
    main()
