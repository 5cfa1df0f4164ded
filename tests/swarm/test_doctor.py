"""`peer doctor` against a real local swarm (a bootstrap node and one peer on 127.0.0.1):
every check passes and the verdict says so; a run nobody is in and bad flags are reported.
The blocked-port case runs across namespaces (tests/netns/test_doctor_netns.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.swarm.harness import Swarm

RUN = ["--model", "tiny", "--target-steps", "40", "--max-round-seconds", "20", "--batch-size", "4",
       "--eval-batches", "1", "--run-id", "doctor-run"]
LOCAL_DOCTOR = ["--host", "127.0.0.1", "--dht-host-maddrs", "/ip4/127.0.0.1/tcp/0"]
pytestmark = pytest.mark.timeout(300)


def doctor(*args: str, timeout_s: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "peer.cli", "doctor", *args], capture_output=True, text=True,
                          timeout=timeout_s)


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    s = Swarm(tmp_path_factory.mktemp("doctor"), RUN)
    try:
        s.start_bootstrap()
        s.start_peer("a")
        s.wait_rounds("a", 1, 120)
        yield s
    finally:
        s.stop_all()


def test_doctor_passes_on_a_healthy_swarm(swarm):
    p = doctor("--initial-peers", swarm.bootstrap_addr, "--run-id", "doctor-run", *LOCAL_DOCTOR)
    out = p.stdout
    assert p.returncode == 0, out + p.stderr[-3000:]
    for name in ("DHT", "run", "gRPC port", "DHT port", "clock", "link"):
        assert f"[  ok] {name}" in out, f"{name} did not pass:\n{out}"
    assert "model tiny, codec int8, target 40 steps, 1 live peer(s) (1 serving)" in out
    assert "reachable from peer" in out and "Mbit/s" in out and "one round's update (int8" in out
    assert "verdict: OK, this machine can join run doctor-run as a serving peer" in out


def test_doctor_on_a_run_nobody_is_in(swarm):
    p = doctor("--initial-peers", swarm.bootstrap_addr, "--run-id", "no-such-run", *LOCAL_DOCTOR)
    assert p.returncode == 0, p.stdout + p.stderr[-3000:]
    assert "no run named 'no-such-run' in the DHT" in p.stdout
    assert "[skip] gRPC port no serving peer of the run to check against" in p.stdout


def test_doctor_client_mode_needs_no_inbound(swarm):
    p = doctor("--initial-peers", swarm.bootstrap_addr, "--run-id", "doctor-run", "--client-mode", *LOCAL_DOCTOR)
    assert p.returncode == 0, p.stdout + p.stderr[-3000:]
    assert "[skip] gRPC port client mode" in p.stdout and "[  ok] link" in p.stdout
    assert "as a client-mode peer" in p.stdout


@pytest.mark.parametrize("args, says", [
    ([], "--initial-peers"),
    (["--initial-peers", "/ip4/127.0.0.1/tcp/1/p2p/QmSoLnSGccFuZQJzRadHn95W2CrSFmZuTdDWP8HXaHca9z", "--port", "70000"],
     "--port: 70000 is not valid"),
    (["--initial-peers", "nonsense"], "nonsense"),
])
def test_doctor_bad_flags_exit_2(args, says):
    p = doctor(*args, timeout_s=60)
    assert p.returncode == 2, p.stdout + p.stderr
    assert says in p.stderr
