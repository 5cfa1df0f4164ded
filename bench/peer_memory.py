"""A peer's memory against its model's size: the peak resident set (VmHWM) of real `peer`
processes, a swarm of --peers on 127.0.0.1 beside one peer training alone (--min-peers 1) on
the same preset, so the difference is what averaging with the others holds (state, snapshots,
residuals, shards in flight, the update log). Prints, per codec, each process's peak in MB and
that difference as a multiple of the model's float32 bytes. Prints a table; not a test.

    .venv/bin/python bench/peer_memory.py [--model base] [--peers 4] [--rounds 4] [--codecs fp32 int8]
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


def peak_kb(pid: int) -> int:
    """The process's VmHWM (peak resident set), kB; 0 once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class PeakWatch:
    """Samples each process's VmHWM until it exits (the mark only grows; the last read counts)."""

    def __init__(self, procs):
        self.procs, self.peaks = procs, [0] * len(procs)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            for i, p in enumerate(self.procs):
                self.peaks[i] = max(self.peaks[i], peak_kb(p.pid))
            self.stop.wait(0.2)

    def close(self) -> list[int]:
        self.stop.set()
        self.thread.join(5)
        return self.peaks


def run(root: Path, codec: str, model: str, peers: int, rounds: int, target: int) -> list[int]:
    run_args = ["--model", model, "--codec", codec, "--target-steps", str(target), "--min-peers", str(peers),
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
        return peaks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="base", choices=sorted(NUMEL))
    ap.add_argument("--peers", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--target-steps", type=int, default=8)
    ap.add_argument("--codecs", nargs="+", default=["fp32", "int8"])
    args = ap.parse_args()
    if args.peers < 2 or args.rounds < 1:
        ap.error("need --peers >= 2 and --rounds >= 1")
    model_mb = 4 * NUMEL[args.model] / 1e6
    print(f"model {args.model}: {model_mb:.1f} MB of float32 parameters; {args.peers} peers on loopback, "
          f"{args.rounds} rounds; peak resident set (VmHWM) per process; 2-core machine shared")
    print(f"{'codec':8} {'alone MB':>9} {'swarm MB (median, max)':>24} {'swarm - alone':>14} {'x model':>8}")
    t0 = time.monotonic()
    for codec in args.codecs:
        with tempfile.TemporaryDirectory() as tmp:
            alone = run(Path(tmp), codec, args.model, 1, args.rounds, args.target_steps)
        with tempfile.TemporaryDirectory() as tmp:
            swarm = run(Path(tmp), codec, args.model, args.peers, args.rounds, args.target_steps)
        a, med, top = alone[0] / 1e3, statistics.median(swarm) / 1e3, max(swarm) / 1e3
        print(f"{codec:8} {a:9.0f} {med:14.0f} {top:9.0f} {top - a:14.0f} {(top - a) / model_mb:8.1f}")
    print(f"({time.monotonic() - t0:.0f} s)")


if __name__ == "__main__":
    main()
