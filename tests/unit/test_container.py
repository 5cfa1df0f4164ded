"""The image's entrypoint (`python -m peer.container CMD ...`) as a real process: the child's exit
status becomes the container's (2, 3, 4 -> 0 with a last line saying why, unless
DILOCO_RESTART_SAFE=0), a signal death stays nonzero, SIGTERM reaches the child."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from peer.container import container_status
from tests.procs import start_proc, wait_for_line

pytestmark = pytest.mark.timeout(60)
BIN = str(Path(sys.executable).parent)  # where the `peer` and `bootstrap` console scripts are


def entrypoint(*argv: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}", **env}
    return subprocess.run([sys.executable, "-m", "peer.container", *argv], capture_output=True, text=True,
                          timeout=60, env=full_env)


def exits(status: int) -> list[str]:
    return [sys.executable, "-c", f"raise SystemExit({status})"]


def last_line(p: subprocess.CompletedProcess) -> str:
    return p.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("status, meaning", [(2, "configuration error"), (3, "authentication failed"),
                                             (4, "incompatible run")])
def test_statuses_a_restart_cannot_fix_exit_0_saying_why(status, meaning):
    p = entrypoint(*exits(status))
    assert p.returncode == 0, p.stderr
    name = Path(sys.executable).name
    assert f"{name} exited with status {status} ({meaning}): not restarting; " in last_line(p), p.stderr


def test_restart_safe_0_gives_the_raw_status():
    p = entrypoint(*exits(2), DILOCO_RESTART_SAFE="0")
    assert p.returncode == 2, p.stderr
    assert "DILOCO_RESTART_SAFE=0: container exit 2" in last_line(p)


def test_crash_and_clean_exit_keep_their_status():
    p = entrypoint(*exits(1))
    assert p.returncode == 1 and "exited with status 1 (crash): a restart policy restarts it" in last_line(p)
    p = entrypoint(*exits(0))
    assert p.returncode == 0 and p.stderr == ""


def test_death_by_a_signal_is_nonzero():
    p = entrypoint(sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    assert p.returncode == 128 + signal.SIGKILL, p.stderr
    assert "was killed by SIGKILL: container exit 137, a restart policy restarts it" in last_line(p)
    assert container_status(-signal.SIGTERM, restart_safe=True) == 143


def test_a_bad_flag_of_the_real_peer_does_not_ask_for_a_restart():
    p = entrypoint("peer", "--batch-size", "0")
    assert p.returncode == 0, p.stderr
    lines = p.stderr.strip().splitlines()
    assert "--batch-size: 0 is not valid" in lines[-2], p.stderr  # the peer's own line stays just above
    assert "peer exited with status 2 (configuration error): not restarting; fix the flag above" in lines[-1]


def test_unknown_command_and_bad_setting_are_configuration_errors():
    p = entrypoint("no-such-command-here")
    assert p.returncode == 0 and "cannot run 'no-such-command-here'" in p.stderr, p.stderr
    assert entrypoint("no-such-command-here", DILOCO_RESTART_SAFE="0").returncode == 2
    p = entrypoint(*exits(0), DILOCO_RESTART_SAFE="yes")
    assert p.returncode == 0
    assert "DILOCO_RESTART_SAFE: 'yes' is not valid; expected 1" in p.stderr and "not starting" in p.stderr
    assert entrypoint().returncode == 0  # no command at all


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stop_signals_reach_the_child(tmp_path, sig):
    child = ("import signal, sys, time\n"
             "def leave(signum, frame):\n"
             "    print('child got', signal.Signals(signum).name, flush=True); sys.exit(0)\n"
             "signal.signal(signal.SIGTERM, leave); signal.signal(signal.SIGINT, leave)\n"
             "print('ready', flush=True)\n"
             "time.sleep(50)\n")
    proc = start_proc([sys.executable, "-m", "peer.container", sys.executable, "-c", child], None,
                      tmp_path / "entrypoint.log")
    try:
        wait_for_line(proc, r"^ready$", timeout_s=20)
        proc.send_signal(sig)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert f"child got {sig.name}" in proc.log_path.read_text()


def test_the_cuda_dockerfile_differs_only_in_its_base():
    docker = Path(__file__).resolve().parent.parent.parent / "docker"
    cpu = (docker / "Dockerfile").read_text().splitlines()
    cuda = (docker / "Dockerfile.cuda").read_text().splitlines()
    assert len(cpu) == len(cuda)
    differ = [(a, b) for a, b in zip(cpu, cuda, strict=True) if a != b]
    assert len(differ) == 1 and all(line.startswith("ARG BASE=") for line in differ[0]), differ
    assert "cuda" in differ[0][1] and "cuda" not in differ[0][0]
