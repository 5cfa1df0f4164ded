"""`--http-port` on real processes: a bootstrap node and two peers serve `/status`; a port
already in use is a configuration error (exit 2) that names it."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from tests.procs import python_module, start_proc, stop, wait_for_line
from tests.swarm.harness import LOCAL, Swarm

RUN = ["--model", "tiny", "--target-steps", "40", "--max-round-seconds", "20", "--min-peers", "2",
       "--batch-size", "4", "--eval-batches", "1", "--join-window-s", "4", "--run-id", "http-run"]
pytestmark = pytest.mark.timeout(300)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(port: int, path: str = "/status", timeout_s: float = 5.0) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout_s) as r:
        assert r.headers["Content-Type"].startswith("application/json")
        return json.loads(r.read())


def wait_json(port: int, ok, timeout_s: float, path: str = "/status") -> dict:
    """Polls until ok(answer) holds; the last answer or error is in the failure."""
    deadline, last = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        try:
            last = get_json(port, path)
            if ok(last):
                return last
        except (urllib.error.URLError, ConnectionError) as e:
            last = e
        time.sleep(0.3)
    raise AssertionError(f"{path} on port {port} did not get there within {timeout_s} s; last: {last!r}")


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    s = Swarm(tmp_path_factory.mktemp("http"), RUN)
    s.http = {name: free_port() for name in ("a", "b")}
    try:
        s.start_bootstrap()
        for name, port in s.http.items():
            s.start_peer(name, ["--http-port", str(port)])
        s.wait_rounds("b", 2, 120)
        yield s
        s.assert_one_digest_per_round()
    finally:
        s.stop_all()


def test_peer_status_matches_its_metrics_file(swarm):
    for name, port in swarm.http.items():
        status = wait_json(port, lambda st: st["last_round"] is not None and st["last_round"]["round"] >= 1, 60)
        rows = swarm.by_round(name)
        last = status["last_round"]
        assert last == json.loads(json.dumps(rows[last["round"]])), "the last round in /status is the file's row"
        assert status["run_id"] == "http-run" and status["address"].startswith("127.0.0.1:")
        assert status["phase"] in ("sync", "wait", "train", "average")
        assert status["peers_in_view"] >= 1
        assert status["deadlines"]["join_window_s"] >= 3 and status["deadlines"]["transfer_timeout_s"] >= 5
        upto = [r for r in rows.values() if r["round"] <= last["round"]]
        assert sum(status["rounds"].values()) >= len(upto)
        assert status["bytes_sent"] >= sum(r["bytes_sent"] for r in upto) > 0


def test_bootstrap_status(tmp_path):
    port = free_port()
    proc = start_proc(python_module("bootstrap", "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--http-port", str(port),
                                    "--refresh-period-s", "0.5"), None, tmp_path / "bootstrap.log")
    try:
        join = wait_for_line(proc, r"^Join through: (\S+)", 60).group(1)
        status = wait_json(port, lambda st: True, 30)
        assert status["role"] == "bootstrap" and join in status["join"]
        assert status["peer_id"] in join
    finally:
        assert stop(proc) == 0


def test_http_port_in_use_exits_2(swarm, tmp_path):
    taken = swarm.http["a"]
    p = subprocess.run([sys.executable, "-m", "peer.cli", *LOCAL, *RUN, "--http-port", str(taken),
                        "--initial-peers", swarm.bootstrap_addr], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr[-2000:]
    assert f"--http-port {taken}: cannot listen on it" in p.stderr
