"""What watching a peer costs: every `--http-port` handler runs on the peer's network loop, the
loop that also runs its rounds. Starts a local swarm (a bootstrap node and 2 peers, one with
--http-port), then for each endpoint times N sequential requests (p50, p99, bytes), and compares
the swarm's round seconds with no scraping against a scraper hitting every endpoint at `--hz`.

    python bench/http_cost.py [--requests 200] [--hz 10] [--rounds 8]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from local_swarm import LocalSwarm  # noqa: E402

ENDPOINTS = ("/status", "/metrics", "/api/swarm", "/")
RUN = ["--model", "tiny", "--target-steps", "60", "--max-round-seconds", "30", "--min-peers", "2",
       "--batch-size", "4", "--eval-batches", "1", "--run-id", "http-cost"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(port: int, path: str) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=15) as r:
        return len(r.read())


def wait_up(port: int, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            get(port, "/status")
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError("the peer's HTTP server did not answer")


def wait_rows(swarm: LocalSwarm, name: str, count: int, timeout_s: float = 600) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            rows = swarm.metrics(name)
        except FileNotFoundError:
            rows = []
        if len(rows) >= count:
            return rows
        time.sleep(0.5)
    raise TimeoutError(f"{name} did not reach {count} rounds")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--hz", type=float, default=10.0, help="scrapes per second of every endpoint while training")
    ap.add_argument("--rounds", type=int, default=8, help="rounds measured with and without scraping")
    args = ap.parse_args()
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp, LocalSwarm(Path(tmp)) as swarm:
        swarm.peer("a", [*RUN, "--http-port", str(port)])
        swarm.peer("b", RUN)
        wait_up(port)
        wait_rows(swarm, "a", 2)
        print(f"endpoint latency on a training peer ({args.requests} sequential requests each):")
        for path in ENDPOINTS:
            times, size = [], 0
            for _ in range(args.requests):
                t = time.perf_counter()
                size = get(port, path)
                times.append(time.perf_counter() - t)
            times.sort()
            print(f"  {path:<11} p50 {statistics.median(times) * 1e3:7.1f} ms  p99 "
                  f"{times[int(0.99 * (len(times) - 1))] * 1e3:7.1f} ms  {size / 1e3:7.1f} kB")
        start = len(swarm.metrics("a"))
        quiet = wait_rows(swarm, "a", start + args.rounds)[start:start + args.rounds]
        stop = threading.Event()
        scraped = [0]

        def scrape() -> None:
            while not stop.is_set():
                for path in ENDPOINTS:
                    get(port, path)
                scraped[0] += 1
                stop.wait(1 / args.hz)

        thread = threading.Thread(target=scrape, daemon=True)
        thread.start()
        start = len(swarm.metrics("a"))
        busy = wait_rows(swarm, "a", start + args.rounds)[start:start + args.rounds]
        stop.set()
        thread.join(20)

        def summary(rows: list[dict]) -> str:
            sec = [r["round_seconds"] for r in rows]
            avg = [r["average_seconds"] for r in rows]
            sps = [r["samples_per_s"] for r in rows]
            return (f"round {statistics.median(sec):.2f} s, averaging {statistics.median(avg):.2f} s, "
                    f"{statistics.median(sps):.0f} samples/s (medians of {len(rows)} rounds)")

        print(f"peer a, no scraping:            {summary(quiet)}")
        print(f"peer a, all endpoints at {args.hz:g} Hz: {summary(busy)}; {scraped[0]} scrapes")


if __name__ == "__main__":
    main()
