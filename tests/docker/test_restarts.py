"""Docker's `restart: on-failure` against the image's exit statuses, on the real engine: a bad flag
(peer status 2) ends the container with 0 and one line saying why, and is never restarted; a crash
(status 1) is restarted; DILOCO_RESTART_SAFE=0 gives the raw status."""

from __future__ import annotations

import os
import socket
import time

import pytest

from tests.docker.containers import inspect, log_lines, wait_exited, wait_until
from tests.docker.images import docker

pytestmark = pytest.mark.timeout(1800)  # the first test may build the image (about 10 minutes cold)
OBSERVE_S = 5.0  # Docker restarts a failed container after 100 ms (doubling): 5 s without one is none


@pytest.fixture
def run_container(image):
    """Factory: `docker run -d --network host IMAGE ARGS` under a unique name; removed afterwards."""
    names: list[str] = []

    def start(*args: str, docker_args: tuple[str, ...] = ()) -> str:
        name = f"diloco-test-{os.getpid()}-{len(names)}-{time.monotonic_ns() % 10**6}"
        names.append(name)
        docker("run", "-d", "--name", name, "--network", "host", "-e", "DILOCO_HTTP_PORT=0", *docker_args,
               image, *args)
        return name

    yield start
    for name in names:
        docker("rm", "-f", "-v", name, check=False)


def test_a_bad_flag_is_not_restarted(run_container):
    name = run_container("peer", "--batch-size", "0", docker_args=("--restart", "on-failure"))
    assert wait_exited(name, 60)["ExitCode"] == 0
    time.sleep(OBSERVE_S)
    state = inspect(name)
    assert state["RestartCount"] == 0 and state["State"]["Status"] == "exited", state["State"]
    lines = log_lines(name)
    assert "--batch-size: 0 is not valid" in lines[-2], lines
    assert lines[-1].endswith("peer exited with status 2 (configuration error): not restarting; fix the flag "
                              "above and start the container again"), lines


def test_a_crash_is_restarted(run_container):
    with socket.socket() as busy:  # the node's DHT port is taken: bootstrap exits 1 (a crash), every time
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        name = run_container("bootstrap", "--host-maddrs", f"/ip4/127.0.0.1/tcp/{port}",
                             docker_args=("--restart", "on-failure"))
        wait_until(name, "restarted twice", lambda c: c["RestartCount"] >= 2, 120)
        docker("update", "--restart", "no", name)  # stop the loop before the port is freed
    lines = log_lines(name)
    assert any(line.endswith("bootstrap exited with status 1 (crash): a restart policy restarts it")
               for line in lines), lines
    assert any(f"/ip4/127.0.0.1/tcp/{port}" in line and "in use" in line for line in lines), lines


def test_restart_safe_0_gives_the_raw_status(image):
    p = docker("run", "--rm", "--network", "host", "-e", "DILOCO_RESTART_SAFE=0", image, "peer", "--batch-size",
               "0", check=False)
    assert p.returncode == 2, p.stderr
    assert "DILOCO_RESTART_SAFE=0: container exit 2" in p.stderr.strip().splitlines()[-1], p.stderr
