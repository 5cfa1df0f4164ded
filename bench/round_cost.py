"""Seconds per round and bytes per peer per round for a local swarm of 3 peers (bootstrap
node + peers on 127.0.0.1), once per codec. Prints a table; not a test.

    .venv/bin/python bench/round_cost.py [--model small] [--rounds 4] [--codecs fp32 int8]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LOCAL = ["--dht-host-maddrs", "/ip4/127.0.0.1/tcp/0", "--host", "127.0.0.1", "--threads", "1"]


def run_swarm(root: Path, codec: str, model: str, rounds: int, peers: int, target: int) -> list[list[dict]]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    procs = []
    try:
        boot_log = root / "bootstrap.log"
        procs.append(subprocess.Popen([sys.executable, "-m", "bootstrap", "--host-maddrs", "/ip4/127.0.0.1/tcp/0"],
                                      stdout=open(boot_log, "wb"), stderr=subprocess.STDOUT, env=env))
        deadline = time.monotonic() + 60
        while not (m := re.search(r"Join through: (\S+)", boot_log.read_text())):
            if time.monotonic() > deadline:
                raise TimeoutError("bootstrap node did not start")
            time.sleep(0.2)
        run = ["--model", model, "--codec", codec, "--target-steps", str(target), "--min-peers", str(peers),
               "--max-rounds", str(rounds), "--eval-batches", "1", "--batch-size", "4", "--run-id", f"bench-{codec}"]
        for i in range(peers):
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "peer.cli", *LOCAL, *run, "--initial-peers", m.group(1),
                 "--metrics-file", str(root / f"p{i}.jsonl")],
                stdout=open(root / f"p{i}.log", "wb"), stderr=subprocess.STDOUT, env=env))
        for p in procs[1:]:
            p.wait(timeout=1800)
        return [[json.loads(x) for x in (root / f"p{i}.jsonl").read_text().splitlines()] for i in range(peers)]
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.wait(15)


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
