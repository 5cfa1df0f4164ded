"""docker/compose.yaml on the real engine: a bootstrap node and 3 peer containers train together
until --max-rounds, every health check passes, every peer exits 0 and never restarts, and the
peers' digests agree per round. On the way, `docker stop` of a training peer: it exits 0 within
Docker's default grace, having written a checkpoint on exit, and resumes from it when started
again. Every process in the containers runs as the image's non-root user."""

from __future__ import annotations

import os
import re
import subprocess
import time
from dataclasses import dataclass, field

import psutil
import pytest

from tests.docker.containers import free_port_block, inspect, log_lines, metrics, read_file, tail, wait_exited
from tests.docker.images import REPO_ROOT

pytestmark = pytest.mark.timeout(1800)  # the module's fixture may build the image (about 10 minutes cold)
COMPOSE_FILE = REPO_ROOT / "docker" / "compose.yaml"
SERVICES = ("bootstrap", "peer1", "peer2", "peer3")
PEERS = SERVICES[1:]
ROUNDS = 30  # enough that peer1 and peer2 still train when peer3 is back from its docker stop
GRACE_S = 10  # docker stop's default


class Compose:
    def __init__(self, project: str, env: dict[str, str]):
        self.project, self.env = project, {**os.environ, **env}

    def __call__(self, *args: str, timeout_s: float = 120) -> str:
        p = subprocess.run(["docker-compose", "-p", self.project, "-f", str(COMPOSE_FILE), *args],
                           capture_output=True, text=True, timeout=timeout_s, env=self.env)
        if p.returncode:
            raise RuntimeError(f"docker-compose {' '.join(args)} exited {p.returncode}:\n{p.stdout}\n{p.stderr}")
        return p.stdout

    def container(self, service: str) -> str:
        return self("ps", "-q", service).strip()


@dataclass
class Outcome:
    """What the scenario saw; each test checks one part of it."""

    ids: dict[str, str] = field(default_factory=dict)
    healthy: set[str] = field(default_factory=set)
    uids: dict[str, set[int]] = field(default_factory=dict)
    stop_s: float = 0.0
    stopped: dict = field(default_factory=dict)
    stop_log: list[str] = field(default_factory=list)
    restart_log: list[str] = field(default_factory=list)
    others_training_at_restart: bool = False
    final: dict[str, dict] = field(default_factory=dict)
    rows: dict[str, list[dict]] = field(default_factory=dict)
    owners: dict[str, int] = field(default_factory=dict)


def _wait_healthy(ids: dict[str, str], out: Outcome, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while out.healthy != set(ids):
        for service, cid in ids.items():
            state = inspect(cid)["State"]
            if state.get("Health", {}).get("Status") == "healthy":
                out.healthy.add(service)
            elif state["Status"] != "running" and service not in out.healthy:
                raise AssertionError(f"{service} {state['Status']} before it was healthy:\n{tail(cid)}")
        if time.monotonic() > deadline:
            raise AssertionError(f"not healthy after {timeout_s} s: {set(ids) - out.healthy}")
        time.sleep(0.5)


def _uids(cid: str) -> set[int]:
    """Real uids of every process of the container (its PID 1, docker-init, and all below it)."""
    root = psutil.Process(inspect(cid)["State"]["Pid"])
    return {p.uids().real for p in (root, *root.children(recursive=True))}


def _wait_log(cid: str, regex: str, timeout_s: float, after: int = 0) -> re.Match:
    deadline = time.monotonic() + timeout_s
    while True:
        lines = log_lines(cid)[after:]
        for line in lines:
            if match := re.search(regex, line):
                return match
        if time.monotonic() > deadline:
            raise AssertionError(f"no line like {regex!r} in {cid} after {timeout_s} s:\n{tail(cid)}")
        time.sleep(0.5)


def _scenario(compose: Compose, out: Outcome) -> None:
    compose("up", "-d", "--no-build")
    out.ids = {s: compose.container(s) for s in SERVICES}
    _wait_healthy(out.ids, out, timeout_s=240)
    out.uids = {s: _uids(cid) for s, cid in out.ids.items()}

    peer3 = out.ids["peer3"]  # docker stop while it trains, then start it again
    _wait_log(peer3, r"round \d+: applied, 3 peers", timeout_s=120)
    started = time.monotonic()
    subprocess.run(["docker", "stop", "-t", str(GRACE_S), peer3], check=True, capture_output=True, timeout=60)
    out.stop_s = time.monotonic() - started
    out.stopped = inspect(peer3)["State"]
    out.stop_log = log_lines(peer3)
    subprocess.run(["docker", "start", peer3], check=True, capture_output=True, timeout=60)
    _wait_log(peer3, r"restored the inner optimizer", timeout_s=120, after=len(out.stop_log))
    out.others_training_at_restart = all(inspect(out.ids[p])["State"]["Status"] == "running" for p in PEERS[:2])

    for service in PEERS:
        out.final[service] = wait_exited(out.ids[service], timeout_s=300)
        out.final[service]["RestartCount"] = inspect(out.ids[service])["RestartCount"]
        out.rows[service] = metrics(out.ids[service])
        out.owners[service] = read_file(out.ids[service], "/data/metrics.jsonl")[1].uid
    out.restart_log = log_lines(peer3)[len(out.stop_log):]


@pytest.fixture(scope="module")
def swarm(image):
    compose = Compose(f"diloco-test-{os.getpid()}-{time.monotonic_ns() % 10**6}",
                      {"DILOCO_IMAGE": image, "SWARM_PORTS": str(free_port_block()), "SWARM_ROUNDS": str(ROUNDS)})
    out = Outcome()
    try:
        _scenario(compose, out)
        yield out
    finally:
        try:
            compose("down", "-v", "-t", "5", timeout_s=180)
        finally:
            left = subprocess.run(["docker", "ps", "-aq", "--filter", f"label=com.docker.compose.project="
                                   f"{compose.project}"], capture_output=True, text=True, timeout=30).stdout.split()
            vols = subprocess.run(["docker", "volume", "ls", "-q", "--filter", f"label=com.docker.compose.project="
                                   f"{compose.project}"], capture_output=True, text=True, timeout=30).stdout.split()
            if left or vols:
                subprocess.run(["docker", "rm", "-f", "-v", *left], capture_output=True, timeout=60)
                subprocess.run(["docker", "volume", "rm", "-f", *vols], capture_output=True, timeout=60)


def test_every_service_becomes_healthy(swarm):
    assert swarm.healthy == set(SERVICES)


def test_peers_train_together_exit_0_and_agree(swarm):
    for peer in PEERS:
        final = swarm.final[peer]
        assert final["ExitCode"] == 0 and final["RestartCount"] == 0, (peer, final)
        assert not final["OOMKilled"]
    for peer in PEERS[:2]:  # peer3's count starts again after its restart
        assert len(swarm.rows[peer]) == ROUNDS
    digests: dict[int, set[str]] = {}
    for peer in PEERS:
        for row in swarm.rows[peer]:
            digests.setdefault(row["state_round"], set()).add(row["digest"])
    assert all(len(d) == 1 for d in digests.values()), {r: d for r, d in digests.items() if len(d) > 1}
    together = [r for r in swarm.rows["peer1"] if r["outcome"] == "applied" and r["group_size"] == 3]
    assert len(together) >= 3, [(r["round"], r["outcome"], r["group_size"]) for r in swarm.rows["peer1"]]
    evals = [r["eval_loss"] for r in swarm.rows["peer1"]]
    assert evals[-1] < evals[0], evals


def test_docker_stop_checkpoints_within_the_grace_and_the_peer_resumes(swarm):
    assert swarm.stop_s < GRACE_S, f"docker stop took {swarm.stop_s:.1f} s: the peer was killed"
    assert swarm.stopped["ExitCode"] == 0, swarm.stopped
    written = [m for line in swarm.stop_log if (m := re.search(r"checkpoint of round (\d+) written on exit", line))]
    assert written, "\n".join(swarm.stop_log[-30:])
    restored = [m for line in swarm.restart_log
                if (m := re.search(r"restored the inner optimizer, data position and residuals of round (\d+)", line))]
    assert restored and restored[0].group(1) == written[-1].group(1), "\n".join(swarm.restart_log[:30])
    assert swarm.others_training_at_restart, "peer1 and peer2 had finished before peer3 came back: raise ROUNDS"
    after = [r for r in swarm.rows["peer3"] if r["round"] >= int(written[-1].group(1)) and r["outcome"] == "applied"
             and r["group_size"] >= 2]
    assert after, [(r["round"], r["outcome"], r["group_size"]) for r in swarm.rows["peer3"]]


def test_everything_runs_as_the_non_root_user(swarm, image):
    assert inspect(image)["Config"]["User"] == "diloco"
    for service, uids in swarm.uids.items():
        assert uids and 0 not in uids, (service, uids)
        assert len(uids) == 1, (service, uids)
    assert set(swarm.owners.values()) == swarm.uids["peer1"], swarm.owners  # the files on the volumes too


def test_peers_join_through_the_file_the_bootstrap_wrote(swarm):
    joins = [line.split("Join through: ", 1)[1] for line in log_lines(swarm.ids["bootstrap"])
             if "Join through: " in line]
    assert joins and all("/p2p/" in a for a in joins), joins
    for peer in PEERS:
        found = [line for line in log_lines(swarm.ids[peer]) if "initial peers from /shared/bootstrap.txt: " in line]
        assert found and all(line.endswith(" ".join(joins)) for line in found), (peer, found, joins)
