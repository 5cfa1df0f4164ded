"""A peer's memory against its model's size: the peak resident set (VmHWM) of real `peer`
processes, a swarm of --peers on 127.0.0.1 beside one peer training alone (--min-peers 1) on
the same preset, so the difference is what averaging with the others holds (state, snapshots,
residuals, shards in flight, the update log). Prints, per codec, each process's peak in MB and
that difference as a multiple of the model's float32 bytes. Prints a table; not a test.

    .venv/bin/python bench/peer_memory.py [--model base] [--peers 4] [--rounds 4] [--codecs fp32 int8] [--huge-pages on off]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from local_swarm import LocalSwarm  # noqa: E402

NUMEL = {"tiny": 120_576, "small": 3_257_856, "base": 14_393_088}


def memory_kb(pid: int) -> tuple[int, int]:
    """The process's (VmHWM, VmRSS): peak and current resident set, kB; (0, 0) once it is gone."""
    got = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(("VmHWM:", "VmRSS:")):
                got[line[:5]] = int(line.split()[1])
    except OSError:
        pass
    return got.get("VmHWM", 0), got.get("VmRSS", 0)


class PeakWatch:
    """Samples each process's VmHWM (the mark only grows; the last read counts) and VmRSS, with
    the time, until it exits."""

    def __init__(self, procs):
        self.procs, self.peaks = procs, [0] * len(procs)
        self.rss: list[list[tuple[float, int]]] = [[] for _ in procs]
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            now = time.monotonic()
            for i, p in enumerate(self.procs):
                hwm, rss = memory_kb(p.pid)
                self.peaks[i] = max(self.peaks[i], hwm)
                if rss:
                    self.rss[i].append((now, rss))
            self.stop.wait(0.2)

    def close(self) -> list[int]:
        self.stop.set()
        self.thread.join(5)
        return self.peaks

    def quarter_peaks(self) -> tuple[int, int]:
        """The largest resident set over the second quarter of each process's life and over its
        last quarter, kB (the largest across processes): the last above the second is growth
        that a long run would keep adding (fragmentation, leaks); the first quarter is startup."""
        second, last = 0, 0
        for samples in self.rss:
            if len(samples) < 8:
                continue
            t0, t1 = samples[0][0], samples[-1][0]
            q = (t1 - t0) / 4
            second = max(second, max((kb for t, kb in samples if t0 + q <= t < t0 + 2 * q), default=0))
            last = max(last, max((kb for t, kb in samples if t >= t1 - q), default=0))
        return second, last


def run(root: Path, codec: str, model: str, peers: int, rounds: int, target: int,
        huge_pages: str) -> tuple[list[int], tuple[int, int]]:
    run_args = ["--huge-pages", huge_pages, "--model", model, "--codec", codec, "--target-steps", str(target), "--min-peers", str(peers),
                "--max-rounds", str(rounds), "--eval-batches", "1", "--batch-size", "4",
                "--run-id", f"mem-{codec}-{peers}"]
    with LocalSwarm(root) as swarm:
        procs = [swarm.peer(f"p{i}", run_args) for i in range(peers)]
        watch = PeakWatch(procs)
        for p in procs:
            p.wait(timeout=1800)
        peaks = watch.close()
        bad = [i for i, p in enumerate(procs) if p.returncode != 0]
        if bad:
            raise RuntimeError(f"peers {bad} exited {[procs[i].returncode for i in bad]}; logs in {root}")
        return peaks, watch.quarter_peaks()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="base", choices=sorted(NUMEL))
    ap.add_argument("--peers", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--target-steps", type=int, default=8)
    ap.add_argument("--codecs", nargs="+", default=["fp32", "int8"])
    ap.add_argument("--huge-pages", nargs="+", default=["on"], choices=["on", "off"],
                    help="the peers' --huge-pages settings to compare")
    args = ap.parse_args()
    if args.peers < 2 or args.rounds < 1:
        ap.error("need --peers >= 2 and --rounds >= 1")
    model_mb = 4 * NUMEL[args.model] / 1e6
    print(f"model {args.model}: {model_mb:.1f} MB of float32 parameters; {args.peers} peers on loopback, "
          f"{args.rounds} rounds; peak resident set (VmHWM) per process; 2-core machine shared")
    print("RSS Q2 / Q4: the swarm's largest resident set over the second and the last quarter of the run "
          "(Q4 above Q2 = growth a longer run keeps adding)")
    print(f"{'codec':8} {'huge pages':10} {'alone MB':>9} {'swarm MB (median, max)':>24} {'swarm - alone':>14} "
          f"{'x model':>8} {'RSS Q2 MB':>10} {'RSS Q4 MB':>10}")
    t0 = time.monotonic()
    for codec in args.codecs:
        for huge_pages in args.huge_pages:
            with tempfile.TemporaryDirectory() as tmp:
                alone, _ = run(Path(tmp), codec, args.model, 1, args.rounds, args.target_steps, huge_pages)
            with tempfile.TemporaryDirectory() as tmp:
                swarm, (q2, q4) = run(Path(tmp), codec, args.model, args.peers, args.rounds, args.target_steps,
                                      huge_pages)
            a, med, top = alone[0] / 1e3, statistics.median(swarm) / 1e3, max(swarm) / 1e3
            print(f"{codec:8} {huge_pages:10} {a:9.0f} {med:14.0f} {top:9.0f} {top - a:14.0f} "
                  f"{(top - a) / model_mb:8.1f} {q2 / 1e3:10.0f} {q4 / 1e3:10.0f}", flush=True)
    print(f"({time.monotonic() - t0:.0f} s)")


if __name__ == "__main__":
    main()
