"""A signal to the peer's whole process group (systemd's stop, `kill -- -PGID`, Ctrl-C in a
terminal) ends it as a signal to the peer alone does: soon, with status 0, without a traceback,
and with nothing of it (DHT process, p2pd) left running or listening."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from tests.procs import (
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


@pytest.mark.timeout(90)
@pytest.mark.parametrize("sig, attempt", [(signal.SIGTERM, 1), (signal.SIGTERM, 2), (signal.SIGTERM, 3),
                                          (signal.SIGINT, 1)])
def test_signal_to_the_process_group_stops_the_peer_cleanly(tmp_path, sig, attempt):
    proc = start_proc(python_module("peer.cli", *SOLO, "--run-id", f"group-{sig.name}-{attempt}"),
                      {"OMP_NUM_THREADS": "1"}, tmp_path / "peer.log", new_session=True)
    try:
        wait_for_line(proc, r"round 0: ", 90)
        children = {c: c.name() for c in descendants(proc.pid)}
        ports = listening_ports([proc.pid, *children])
        assert "p2pd" in children.values() and ports, "the DHT process and p2pd should be running"
        started = time.monotonic()
        os.killpg(proc.pid, sig)
        try:
            status = proc.wait(timeout=EXIT_WITHIN_S)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running {EXIT_WITHIN_S:.0f} s after {sig.name} to its group:\n"
                                 f"{log_tail(proc.log_path)}") from None
        took_s = time.monotonic() - started
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    log = proc.log_path.read_text(errors="replace")
    assert status == 0, f"exit status {status} after {took_s:.1f} s:\n{log_tail(proc.log_path)}"
    assert "Traceback" not in log and "Exception ignored" not in log, log_tail(proc.log_path, 60)
    assert f"{sig.name} received: leaving the swarm" in log
    assert "the DHT process is gone" not in log, "the DHT process should outlive the group's signal"
    # torch's shared-memory manager (its own session, no port) ends by itself once its clients are gone
    ours = [c for c, name in children.items() if name != "torch_shm_manager"]
    assert_no_orphans(ours, 5)
    assert not listening_ports(children), f"ports {ports} of the stopped peer: some are still listening"
