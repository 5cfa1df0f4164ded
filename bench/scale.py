"""A round's fixed cost against the group size: our averager on a tiny payload (1 KiB of
float32 by default) for 2, 4, 8, 16 peers on loopback, through bench/allreduce.py's worker
harness (real processes, each a hivemind DHT and our gRPC server, a barrier before each
round). Splits the slowest peer's round into the DHT refresh before joining, the group
agreement (Join until the roster), the shard round trips to every owner, and the leader's
decision (commit). gloo's all_reduce of the same payload is the round-trip floor beside it. Prints a
table; not a test.

    .venv/bin/python bench/scale.py [--k 2 4 8 16] [--bytes 1024] [--rounds 5] [--backends ours gloo hivemind]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from allreduce import swarm_run  # noqa: E402


def slowest(rounds: list[list[dict]]) -> list[dict]:
    """Each round's slowest peer's line."""
    return [max(r, key=lambda p: p["s"]) for r in rounds]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, nargs="+", default=[2, 4, 8, 16])
    ap.add_argument("--bytes", type=int, default=1024, help="payload per peer, bytes of float32 (a multiple of 4)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--codec", default="fp32")
    ap.add_argument("--backends", nargs="+", default=["ours", "gloo"], choices=["ours", "hivemind", "gloo"])
    ap.add_argument("--step-timeout", type=float, default=300.0, help="seconds one round of all peers may take")
    ap.add_argument("--log-dir", default="")
    args = ap.parse_args()
    if min(args.k) < 2 or args.bytes < 4 or args.bytes % 4 or args.rounds < 1:
        ap.error("need every --k >= 2, --bytes a positive multiple of 4 and --rounds >= 1")
    numel = args.bytes // 4
    if min(args.k) > numel:
        ap.error(f"--bytes {args.bytes} is {numel} values: fewer than {min(args.k)} peers' shards")
    run_args = argparse.Namespace(net="loopback", rounds=args.rounds, codecs=[args.codec], backends=args.backends,
                                  step_timeout=args.step_timeout, trace=False)
    log_root = Path(args.log_dir or tempfile.mkdtemp(prefix="scale-"))
    print(f"fixed cost of a round: {args.bytes} bytes of float32 per peer, {args.codec}, {args.rounds} rounds, "
          f"loopback; the slowest peer's seconds, median over rounds (min-max); shared 2-core machine: noisy. "
          f"Logs in {log_root}")
    print(f"{'k':>3} {'backend':12} {'round s':>18} {'refresh s':>10} {'join s':>8} {'transfer s':>10} {'commit s':>8} "
          f"{'failed':>6}")
    for k in args.k:
        log_dir = log_root / f"k{k}"
        log_dir.mkdir(parents=True, exist_ok=True)
        run = swarm_run(k, numel, run_args, log_dir, [None] * k)
        for step, rounds in run.steps.items():
            lines = slowest(rounds)
            times = [p["s"] for p in lines]
            failed = sum(any(p["kind"] != "applied" for p in r) for r in rounds)
            span = f"{statistics.median(times):.3f} ({min(times):.3f}-{max(times):.3f})"
            parts = ""
            if "join_s" in lines[0]:
                parts = " ".join(f"{statistics.median(p[key] for p in lines):{w}.3f}" for key, w in
                                 (("refresh_s", 10), ("join_s", 8), ("transfer_s", 10), ("commit_s", 8)))
            else:
                parts = f"{'-':>10} {'-':>8} {'-':>10} {'-':>8}"
            print(f"{k:3d} {step:12} {span:>18} {parts} {failed:3d}/{len(rounds):<2d}", flush=True)


if __name__ == "__main__":
    main()
