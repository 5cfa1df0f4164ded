"""`make demo`: a bootstrap node and 3 peers on this machine train the built-in model for a
few rounds, then the demo says what they did. Logs and metrics go to ./demo-run/."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from peer.logs import setup_logging

log = logging.getLogger("peer.demo")
OUT = Path("demo-run")
PEERS = 3
ROUNDS = int(os.environ.get("DEMO_ROUNDS", "8"))
RUN = ["--model", os.environ.get("DEMO_MODEL", "small"), "--codec", "int8", "--target-steps", "120",
       "--max-round-seconds", "60", "--min-peers", str(PEERS), "--batch-size", "8", "--inner-lr", "2e-3",
       "--warmup-samples", "2000", "--total-samples", "40000", "--max-rounds", str(ROUNDS),
       "--run-id", "demo", "--threads", "1", "--host", "127.0.0.1", "--dht-host-maddrs", "/ip4/127.0.0.1/tcp/0"]


def spawn(args: list[str], name: str) -> subprocess.Popen:
    logf = open(OUT / f"{name}.log", "wb")  # noqa: SIM115 - lives as long as the child
    return subprocess.Popen([sys.executable, "-m", *args], stdout=logf, stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})


def wait_for(path: Path, pattern: str, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        m = re.search(pattern, path.read_text(errors="replace")) if path.exists() else None
        if m:
            return m.group(1)
        time.sleep(0.2)
    raise TimeoutError(f"no /{pattern}/ in {path} within {timeout_s:.0f} s")


def main() -> int:
    setup_logging("INFO")
    OUT.mkdir(exist_ok=True)
    for f in OUT.glob("*"):
        f.unlink()
    procs: list[subprocess.Popen] = []
    try:
        procs.append(spawn(["bootstrap", "--host-maddrs", "/ip4/127.0.0.1/tcp/0"], "bootstrap"))
        addr = wait_for(OUT / "bootstrap.log", r"Join through: (\S+)", 60)
        log.info("bootstrap node up: %s", addr)
        for i in range(PEERS):
            procs.append(spawn(["peer.cli", *RUN, "--initial-peers", addr, "--seed", str(i),
                                "--metrics-file", str(OUT / f"peer{i}.metrics.jsonl")], f"peer{i}"))
        log.info("%d peers started; training %d rounds (logs in %s/)", PEERS, ROUNDS, OUT)
        follow(OUT / "peer0.log", procs[1:])
        codes = [p.wait(timeout=60) for p in procs[1:]]
        return summarize(codes)
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    p.kill()


def follow(path: Path, peers: list[subprocess.Popen], timeout_s: float = 1800) -> None:
    """Echoes peer0's round lines until every peer exited."""
    seen, deadline = 0, time.monotonic() + timeout_s
    while any(p.poll() is None for p in peers):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the demo did not finish within {timeout_s:.0f} s")
        lines = path.read_text(errors="replace").splitlines() if path.exists() else []
        for line in lines[seen:]:
            if re.search(r"round \d+:|eval loss at the start|ERROR", line):
                print("peer0 | " + line.split(": ", 1)[-1], flush=True)
        seen = len(lines)
        time.sleep(0.5)


def summarize(codes: list[int]) -> int:
    rows = [[json.loads(x) for x in (OUT / f"peer{i}.metrics.jsonl").read_text().splitlines()]
            for i in range(PEERS) if (OUT / f"peer{i}.metrics.jsonl").exists()]
    start = wait_for(OUT / "peer0.log", r"eval loss at the start: ([0-9.]+)", 1)
    entropy = wait_for(OUT / "peer0.log", r"held-out unigram entropy ([0-9.]+)", 1)
    final = [r[-1] for r in rows if r]
    digests = {r["digest"] for r in final}
    print(f"\nexit statuses: {codes}")
    print(f"rounds: {[len(r) for r in rows]}; final digests equal: {len(digests) == 1}")
    if rows and rows[0]:
        per_round = [(x['round_seconds'], x['bytes_sent']) for x in rows[0]]
        print(f"seconds per round (peer0): {sum(s for s, _ in per_round) / len(per_round):.1f}; "
              f"bytes sent per round: {sum(b for _, b in per_round) / len(per_round) / 1e6:.2f} MB")
        print(f"eval loss: {float(start):.3f} at the start -> {rows[0][-1]['eval_loss']:.3f} at the end; "
              f"byte-unigram entropy of the held-out text: {float(entropy):.3f} nats")
    return 0 if all(c == 0 for c in codes) and len(digests) == 1 else 1


if __name__ == "__main__":
    sys.exit(main())
