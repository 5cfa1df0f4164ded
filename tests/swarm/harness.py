"""A local swarm of real processes for tests: a bootstrap node and peers on 127.0.0.1, each
with its own log and metrics file; helpers to wait on rounds and read what the peers wrote."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

from tests.procs import descendants, log_tail, python_module, start_proc, stop, wait_for_line

LOCAL = ["--dht-host-maddrs", "/ip4/127.0.0.1/tcp/0", "--host", "127.0.0.1", "--threads", "1"]


class Swarm:
    def __init__(self, root: Path, run_args: list[str]):
        self.root, self.run_args = root, run_args
        self.procs: dict = {}
        self.lost: set[str] = set()   # peers that died holding states nobody else got (see forget)
        self.bootstrap_addr = ""

    def start_bootstrap(self) -> str:
        proc = self.launch("bootstrap", python_module("bootstrap", "--host-maddrs", self.bootstrap_maddr(),
                                                      "--identity-path", str(self.root / "bootstrap.key")), None)
        self.bootstrap_addr = wait_for_line(proc, r"^Join through: (\S+)", 60).group(1)
        return self.bootstrap_addr

    def start_peer(self, name: str, extra: list[str] = (), env: dict | None = None, join: bool = True):
        args = [*self.host_args(name), *self.run_args, "--metrics-file", str(self.metrics_path(name)), *extra]
        if join:
            args += ["--initial-peers", self.bootstrap_addr]
        return self.launch(name, python_module("peer.cli", *args), {"OMP_NUM_THREADS": "1", **(env or {})})

    # where processes run: on 127.0.0.1 here; tests/links.py's NetSwarm puts each in its namespace
    def host_args(self, name: str) -> list[str]:
        """The peer's DHT and gRPC listen addresses and its torch threads."""
        return LOCAL

    def bootstrap_maddr(self) -> str:
        return "/ip4/127.0.0.1/tcp/0"

    def launch(self, name: str, argv: list[str], env: dict | None):
        """Starts process `name` (log in root/<name>.log) and keeps it in self.procs."""
        proc = start_proc(argv, env, self.root / f"{name}.log")
        self.procs[name] = proc
        return proc

    def metrics_path(self, name: str) -> Path:
        return self.root / f"{name}.metrics.jsonl"

    def metrics(self, name: str) -> list[dict]:
        path = self.metrics_path(name)
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def by_round(self, name: str) -> dict[int, dict]:
        return {row["round"]: row for row in self.metrics(name)}

    def wait_rounds(self, name: str, count: int, timeout_s: float) -> list[dict]:
        """Waits until `name` has reported `count` rounds; fails with its log on timeout or exit."""
        deadline = time.monotonic() + timeout_s
        while True:
            rows = self.metrics(name)
            if len(rows) >= count:
                return rows
            proc = self.procs[name]
            if proc.poll() is not None or time.monotonic() > deadline:
                state = f"exited {proc.returncode}" if proc.poll() is not None else f"timed out after {timeout_s} s"
                raise AssertionError(f"{name} reported {len(rows)} of {count} rounds ({state}):\n"
                                     f"{log_tail(proc.log_path, 60)}")
            time.sleep(0.1)

    def wait_round(self, name: str, round_: int, timeout_s: float = 60) -> dict:
        """Waits until `name` has reported round `round_` and returns its row."""
        deadline = time.monotonic() + timeout_s
        while round_ not in (rows := self.by_round(name)):
            if time.monotonic() > deadline or self.procs[name].poll() is not None:
                raise AssertionError(f"{name} never reported round {round_}:\n{log_tail(self.procs[name].log_path)}")
            time.sleep(0.1)
        return rows[round_]

    def split_states(self, names) -> dict[int, set[str]]:
        """State rounds for which the peers' metrics report more than one digest (must be empty:
        whatever path a peer took to a round's state, it holds the same bytes)."""
        seen: dict[int, set[str]] = {}
        for name in names:
            for row in self.metrics(name):
                seen.setdefault(row["state_round"], set()).add(row["digest"])
        return {r: d for r, d in seen.items() if len(d) > 1}

    def assert_one_digest_per_round(self) -> None:
        """No state round holds two digests across every peer this swarm ever ran (called at
        the end of each swarm's module: whatever happened, one round number is one state)."""
        split = self.split_states([n for n in self.procs if n not in ("bootstrap", *self.lost)])
        assert not split, f"state rounds with two digests across the swarm: {split}"

    def run_to_end(self, peers: dict[str, tuple[list[str], dict | None]], timeout_s: float,
                   during: Callable[[], None] | None = None) -> None:
        """Starts the bootstrap and every peer (name -> (extra args, env)), calls `during` (a test's
        attacker, started while they run), waits for each to exit 0 and checks one digest per round;
        every process is stopped whatever happens."""
        try:
            self.start_bootstrap()
            for name, (extra, env) in peers.items():
                self.start_peer(name, extra, env)
            if during is not None:
                during()
            for name in peers:
                assert self.wait_exit(name, timeout_s) == 0, self.log(name)[-3000:]
            self.assert_one_digest_per_round()
        finally:
            self.stop_all()

    def forget(self, name: str) -> None:
        """Leaves `name` out of the one-digest check: states it held died with it before anyone
        else got them (it trained alone while the others were frozen), or it resumed alone from
        an older checkpoint after the peers holding the newer states left without one."""
        self.lost.add(name)

    def wait_exit(self, name: str, timeout_s: float) -> int:
        return self.procs[name].wait(timeout=timeout_s)

    def log(self, name: str) -> str:
        return Path(self.procs[name].log_path).read_text(errors="replace")

    def children(self, name: str):
        return descendants(self.procs[name].pid)

    def kill(self, name: str) -> None:
        os.kill(self.procs[name].pid, signal.SIGKILL)
        self.procs[name].wait(timeout=10)

    def stop_all(self) -> None:
        for proc in reversed(list(self.procs.values())):
            if proc.poll() is None:
                try:
                    stop(proc, signal.SIGTERM, 15)
                except AssertionError:
                    pass
