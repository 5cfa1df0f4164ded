"""A private run of real peer processes: two peers with the run secret (one from the environment,
one from a file) train together; a peer with the wrong secret and one without any are told so in
one line and exit 3; a peer started with another running peer's key file exits 3; the secret is in
no log and in no process's command line; `peer doctor` checks a private run with the secret's file,
and without it says the run's peers refuse it."""

from __future__ import annotations

import subprocess
from pathlib import Path

import psutil
import pytest

from tests.procs import python_module, wait_for_line
from tests.swarm.harness import Swarm

SECRET = "a-long-run-secret-0123456789"
RUN = ["--model", "tiny", "--target-steps", "40", "--max-round-seconds", "30", "--min-peers", "2",
       "--batch-size", "4", "--eval-batches", "1", "--join-window-s", "5"]
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    root = tmp_path_factory.mktemp("private")
    s = Swarm(root, RUN)
    secret_file = root / "secret.txt"
    secret_file.write_text(SECRET + "\n")
    try:
        s.start_bootstrap()
        s.start_peer("a", ["--max-rounds", "400", "--checkpoint-dir", str(root / "a")], {"DILOCO_RUN_SECRET": SECRET})
        s.start_peer("b", ["--max-rounds", "400", "--run-secret-file", str(secret_file)])
        s.wait_rounds("a", 2, 120)
        yield s
    finally:
        s.stop_all()


def together(s: Swarm, name: str) -> list[dict]:
    return [r for r in s.metrics(name) if r["outcome"] == "applied" and r["group_size"] == 2]


def test_the_peers_with_the_secret_train_together(swarm):
    assert together(swarm, "a") and together(swarm, "b")
    a, b = swarm.by_round("a"), swarm.by_round("b")
    assert all(a[r]["digest"] == b[r]["digest"] for r in set(a) & set(b))


@pytest.mark.parametrize("how, says", [
    (["--run-secret", "not-the-run-secret-42"], "refuse this peer's --run-secret: it is not the run's secret"),
    ([], "this run is private"),
])
def test_a_peer_without_the_secret_is_told_in_one_line_and_exits_3(swarm, how, says):
    name = f"outsider{len(how)}"
    proc = swarm.start_peer(name, ["--max-rounds", "3", *how])
    if how:   # the secret typed on the command line is gone from the process list once the peer runs
        wait_for_line(swarm.root / f"{name}.log", r"peer id ", 60)
        cmdline = " ".join(psutil.Process(proc.pid).cmdline())
        assert "not-the-run-secret-42" not in cmdline and "(hidden)" in cmdline, cmdline
    assert swarm.wait_exit(name, 120) == 3, swarm.log(name)
    errors = [line for line in swarm.log(name).splitlines() if " ERROR " in line]
    assert len(errors) == 1 and says in errors[0], errors
    assert not swarm.metrics(name), "it trained no round with the run"


def test_a_second_peer_with_the_same_key_file_exits_3(swarm):
    key = Path(swarm.root) / "a" / "identity.key"
    assert key.exists()
    proc = swarm.start_peer("twin", ["--max-rounds", "3", "--identity-file", str(key)], {"DILOCO_RUN_SECRET": SECRET})
    assert proc.wait(timeout=120) == 3, swarm.log("twin")
    assert "another running peer has this peer's id" in swarm.log("twin")


def test_the_run_goes_on_and_the_secret_is_in_no_log(swarm):
    before = len(together(swarm, "a"))
    swarm.wait_rounds("a", len(swarm.metrics("a")) + 2, 120)
    assert len(together(swarm, "a")) > before
    for log in Path(swarm.root).glob("*.log"):
        assert SECRET not in log.read_text(errors="replace"), log


@pytest.mark.parametrize("with_secret", [True, False], ids=["secret", "none"])
def test_peer_doctor_checks_a_private_run_with_the_secrets_file(swarm, with_secret):
    args = ["--initial-peers", swarm.bootstrap_addr, "--host", "127.0.0.1", "--dht-host-maddrs",
            "/ip4/127.0.0.1/tcp/0", *(["--run-secret-file", str(swarm.root / "secret.txt")] if with_secret else [])]
    p = subprocess.run(python_module("peer.cli", "doctor", *args), capture_output=True, text=True, timeout=120)
    if with_secret:
        assert p.returncode == 0, p.stdout + p.stderr[-3000:]
        assert "[  ok] gRPC port" in p.stdout and "[  ok] link" in p.stdout, p.stdout
    else:
        assert p.returncode == 1 and "[FAIL] secret    this run is private" in p.stdout, p.stdout + p.stderr[-3000:]
    assert SECRET not in p.stdout + p.stderr
