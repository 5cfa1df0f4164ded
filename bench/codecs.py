"""Encode and decode throughput of every codec (MB/s of float32 input, one torch thread), bytes
against fp32, and the largest error as a share of the codec's per-value bound. Prints a table; not a test.

    .venv/bin/python bench/codecs.py [--mib 16 64] [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from peer.codecs import CODECS, get_codec  # noqa: E402
from peer.config import RunSpec, wire_codec  # noqa: E402


def best_of(repeats: int, fn) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    names = [n for n in CODECS] + [wire_codec(RunSpec(codec="sparse"))]
    print(f"{'MiB':>4} {'codec':<15} {'bytes/fp32':>10} {'encode MB/s':>12} {'decode MB/s':>12} "
          f"{'max |err|':>10} {'1 Gbit/s = MB/s':>16}")
    for mib in args.mib:
        x = torch.randn(mib * (1 << 18), generator=torch.Generator().manual_seed(0))
        for name in names:
            codec = get_codec(name)
            enc_s, data = best_of(args.repeats, lambda c=codec, v=x: c.encode(v))
            dec_s, y = best_of(args.repeats, lambda c=codec, d=data, v=x: c.decode(d, v.numel()))
            mb = 4 * x.numel() / 1e6
            # the link carries the encoded bytes: 1 Gbit/s of them is this many MB/s of float32 input
            link = 125 * 4 * x.numel() / len(data)
            print(f"{mib:>4} {name:<15} {len(data) / (4 * x.numel()):>10.4f} {mb / enc_s:>12.0f} {mb / dec_s:>12.0f} "
                  f"{float((x - y).abs().max()):>10.3g} {link:>16.0f}")


if __name__ == "__main__":
    main()
