"""A signal to the peer's whole process group (systemd's stop, `kill -- -PGID`, Ctrl-C in a
terminal) ends it as a signal to the peer alone does: soon, with status 0, without a traceback,
and with nothing of it (DHT process, p2pd) left running or listening. Also while it starts."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import psutil
import pytest

from tests.procs import (
    POLL_S,
    assert_no_orphans,
    descendants,
    listening_ports,
    log_tail,
    python_module,
    start_proc,
    wait_for_line,
)
from tests.swarm.harness import LOCAL

SOLO = [*LOCAL, "--model", "tiny", "--target-steps", "20", "--eval-batches", "1"]
EXIT_WITHIN_S = 10.0
SHM_MANAGER = "torch_shm_manager"  # torch's, in a session of its own, no port: it ends once its clients are gone


def start_solo_peer(tmp_path, run_id: str) -> subprocess.Popen:
    return start_proc(python_module("peer.cli", *SOLO, "--run-id", run_id), {"OMP_NUM_THREADS": "1"},
                      tmp_path / "peer.log", new_session=True)


def signal_group_and_wait(proc: subprocess.Popen, sig: signal.Signals, *, every_process: bool = False
                          ) -> dict[psutil.Process, str]:
    """Sends `sig` to the peer's group (or to each of its processes, whatever their group, as systemd's
    KillMode=control-group does) and waits for its exit, killing the group if it overruns; returns
    every descendant seen until then, with its name."""
    seen = {c: c.name() for c in descendants(proc.pid)}
    started = time.monotonic()
    if every_process:
        for pid in [proc.pid, *(c.pid for c in seen)]:
            os.kill(pid, sig)
    else:
        os.killpg(proc.pid, sig)
    try:
        while proc.poll() is None:
            for child in descendants(proc.pid):
                if child not in seen:
                    try:
                        seen[child] = child.name()
                    except psutil.NoSuchProcess:
                        pass
            if time.monotonic() - started > EXIT_WITHIN_S:
                raise AssertionError(f"still running {EXIT_WITHIN_S:.0f} s after {sig.name} to its group:\n"
                                     f"{log_tail(proc.log_path)}")
            time.sleep(POLL_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    return seen


def assert_stopped_cleanly(proc: subprocess.Popen, seen: dict[psutil.Process, str], sig: signal.Signals) -> None:
    log = proc.log_path.read_text(errors="replace")
    assert proc.returncode == 0, f"exit status {proc.returncode}:\n{log_tail(proc.log_path)}"
    for bad in ("Traceback", "Exception ignored", "terminate called"):
        assert bad not in log, log_tail(proc.log_path, 60)
    assert f"{sig.name} received: leaving the swarm" in log
    assert "the DHT process is gone" not in log, "the DHT process should outlive the group's signal"
    assert_no_orphans([c for c, name in seen.items() if name != SHM_MANAGER], 5)
    assert not listening_ports(seen), "a process of the stopped peer still listens"


@pytest.mark.timeout(90)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_to_the_process_group_stops_the_peer_cleanly(tmp_path, sig):
    """Once it trains (SIGTERM to the group twice more below, while it starts)."""
    proc = start_solo_peer(tmp_path, f"group-{sig.name}")
    try:
        wait_for_line(proc, r"round 0: ", 90)
        children = {c.name() for c in descendants(proc.pid)}
        assert "p2pd" in children and listening_ports([proc.pid]), "the DHT process, p2pd and gRPC should run"
    except BaseException:
        proc.kill()
        raise
    assert_stopped_cleanly(proc, signal_group_and_wait(proc, sig), sig)


@pytest.mark.timeout(90)
def test_sigterm_to_every_process_of_the_peer_stops_it_cleanly(tmp_path):
    """systemd's stop: p2pd and torch's shared-memory manager get the SIGTERM too (a manager gone
    before the peer once made the peer abort with SIGABRT)."""
    proc = start_solo_peer(tmp_path, "every-process")
    try:
        wait_for_line(proc, r"round 0: ", 90)
        assert SHM_MANAGER in {c.name() for c in descendants(proc.pid)}
    except BaseException:
        proc.kill()
        raise
    seen = signal_group_and_wait(proc, signal.SIGTERM, every_process=True)
    assert_stopped_cleanly(proc, seen, signal.SIGTERM)


def names_of_descendants(pid: int) -> set[str]:
    names = set()
    for child in descendants(pid):
        try:
            names.add(child.name())
        except psutil.NoSuchProcess:
            pass
    return names


@pytest.mark.timeout(90)
@pytest.mark.parametrize("first_seen", [SHM_MANAGER, "p2pd"])
def test_signal_to_the_process_group_while_the_dht_starts(tmp_path, first_seen):
    """While the DHT starts: torch starting its shared-memory manager (the first shared tensor), then
    the fork of the DHT process; or p2pd starting. There a signal once left a read spinning forever
    or logging's lock held."""
    proc = start_solo_peer(tmp_path, f"group-at-start-{first_seen}")
    deadline = time.monotonic() + 90
    while not any(name.startswith(first_seen) for name in names_of_descendants(proc.pid)):
        assert proc.poll() is None and time.monotonic() < deadline, log_tail(proc.log_path)
        time.sleep(0.005)
    assert_stopped_cleanly(proc, signal_group_and_wait(proc, signal.SIGTERM), signal.SIGTERM)
