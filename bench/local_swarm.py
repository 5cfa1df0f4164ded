"""A swarm of real processes on 127.0.0.1 for the benchmarks: a bootstrap node and peers, each
with its log and metrics file under one folder; everything stopped on exit."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

LOCAL = ["--dht-host-maddrs", "/ip4/127.0.0.1/tcp/0", "--host", "127.0.0.1", "--threads", "1"]


class LocalSwarm:
    def __init__(self, root: Path):
        self.root = root
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.procs: list[subprocess.Popen] = []
        self.addr = ""

    def __enter__(self) -> LocalSwarm:
        log = self.root / "bootstrap.log"
        self._spawn(["bootstrap", "--host-maddrs", "/ip4/127.0.0.1/tcp/0"], log, {})
        deadline = time.monotonic() + 60
        while not (m := re.search(r"Join through: (\S+)", log.read_text())):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the bootstrap node did not start; see {log}")
            time.sleep(0.2)
        self.addr = m.group(1)
        return self

    def peer(self, name: str, args: list[str], env: dict | None = None) -> subprocess.Popen:
        return self._spawn(["peer.cli", *LOCAL, *args, "--initial-peers", self.addr,
                            "--metrics-file", str(self.root / f"{name}.jsonl")], self.root / f"{name}.log", env or {})

    def metrics(self, name: str) -> list[dict]:
        return [json.loads(x) for x in (self.root / f"{name}.jsonl").read_text().splitlines()]

    def _spawn(self, args: list[str], log: Path, env: dict) -> subprocess.Popen:
        with open(log, "wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", *args], stdout=out, stderr=subprocess.STDOUT,
                                    env={**self.env, **env})
        self.procs.append(proc)
        return proc

    def __exit__(self, *exc) -> None:
        stop_all(self.procs)


def stop_all(procs: list[subprocess.Popen], grace_s: float = 15) -> None:
    """SIGTERM to every process still running, then at most grace_s each before SIGKILL (and reaped)."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(grace_s)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)
