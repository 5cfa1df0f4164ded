"""The bootstrap node as a real process on 127.0.0.1: join address, peer count, signals, identity, orphans."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess

import pytest
from hivemind.utils import get_dht_time

from peer import records
from peer.config import read_initial_peers_file
from peer.dht import ChildSafeDHT, create_dht
from peer.net import swarm
from tests.fixtures import identity
from tests.procs import (
    assert_no_orphans,
    descendants,
    listening_ports,
    python_module,
    start_proc,
    stop,
    wait_for_line,
)

JOIN_LINE = r"^Join through: (/ip4/127\.0\.0\.1/tcp/(\d+)/p2p/(\w+))$"
SOME_PEER_ID = "QmSoLnSGccFuZQJzRadHn95W2CrSFmZuTdDWP8HXaHca9z"


@pytest.fixture
def bootstrap(tmp_path):
    """Factory: start `python -m bootstrap` on 127.0.0.1; returns (process, join multiaddr, peer id)."""
    started: list[subprocess.Popen] = []

    def start(*extra: str, name: str = "bootstrap", new_session: bool = False) -> tuple[subprocess.Popen, str, str]:
        args = ["--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--identity-path", str(tmp_path / "key"),
                "--refresh-period-s", "0.5", *extra]
        proc = start_proc(python_module("bootstrap", *args), None, tmp_path / f"{name}.log", new_session=new_session)
        started.append(proc)
        match = wait_for_line(proc, JOIN_LINE, timeout_s=30)
        return proc, match.group(1), match.group(3)

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.timeout(120)
def test_peer_joins_and_sigterm_exits_cleanly(bootstrap):
    proc, join_address, _ = bootstrap()
    children = descendants(proc.pid)
    # create_dht, not hivemind.DHT: its fork freezes the garbage of earlier tests' gRPC channels and it
    # has a startup deadline (a bare DHT forked here once waited forever for its ready signal in CI)
    dht = create_dht(initial_peers=[join_address], host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    try:
        wait_for_line(proc, r"\b([1-9]\d*) other DHT peers in the routing table", timeout_s=40)
    finally:
        dht.shutdown()

    assert stop(proc, signal.SIGTERM, timeout_s=10) == 0
    assert_no_orphans(children, timeout_s=5)
    log = proc.log_path.read_text()
    assert "Traceback" not in log, log


@pytest.mark.timeout(60)
def test_join_file_holds_the_join_addresses_and_peers_join_through_it(bootstrap, tmp_path):
    join_file = tmp_path / "join" / "bootstrap.txt"
    join_file.parent.mkdir()
    join_file.write_text("/ip4/127.0.0.1/tcp/1/p2p/QmStaleNodeOfAnEarlierStart\n")
    proc, join_address, _ = bootstrap("--join-file", str(join_file))
    wait_for_line(proc, r"wrote 1 join address\(es\) to ", timeout_s=10)
    printed = re.findall(r"^Join through: (\S+)$", proc.log_path.read_text(), re.MULTILINE)
    assert join_file.read_text() == "".join(f"{a}\n" for a in printed) and printed == [join_address]
    assert [p.name for p in join_file.parent.iterdir()] == ["bootstrap.txt"]  # no temp file left

    addresses = read_initial_peers_file(str(join_file), 1)
    dht = create_dht(initial_peers=list(addresses), host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    try:
        wait_for_line(proc, r"\b([1-9]\d*) other DHT peers in the routing table", timeout_s=20)
    finally:
        dht.shutdown()
    assert stop(proc, signal.SIGTERM, timeout_s=10) == 0


@pytest.mark.timeout(60)
def test_join_file_in_a_missing_directory_exits_2(tmp_path):
    result = subprocess.run(python_module("bootstrap", "--join-file", str(tmp_path / "nowhere" / "join.txt")),
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "--join-file" in result.stderr and "a directory that exists" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.timeout(60)
def test_restart_with_same_identity_keeps_peer_id(bootstrap, tmp_path):
    proc, _, first_id = bootstrap(name="first", new_session=True)
    children = descendants(proc.pid)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in a terminal: the whole group, p2pd included
    assert proc.wait(timeout=10) == 0
    assert_no_orphans(children, timeout_s=5)
    log = proc.log_path.read_text()
    assert not re.search(r"Traceback| ERROR | WARN", log), log  # p2pd did not die under the DHT
    assert (tmp_path / "key").is_file()

    proc, _, second_id = bootstrap(name="second")
    assert second_id == first_id
    assert stop(proc, signal.SIGTERM, timeout_s=10) == 0


@pytest.mark.timeout(60)
def test_kill_9_leaves_no_orphan_holding_a_port(bootstrap):
    proc, _, _ = bootstrap()
    children = descendants(proc.pid)
    assert any(child.name() == "p2pd" for child in children), [c.cmdline() for c in children]
    ports = listening_ports([proc.pid, *children])
    assert ports, "the bootstrap's processes listen on no port"

    proc.kill()
    proc.wait(timeout=10)
    assert_no_orphans(children, timeout_s=5)
    assert not ports & listening_ports(), f"ports {ports & listening_ports()} still listening"


@pytest.mark.timeout(60)
def test_second_node_on_a_busy_port_exits_1(bootstrap):
    proc, _, _ = bootstrap()
    port = wait_for_line(proc, JOIN_LINE, timeout_s=1).group(2)
    args = ["--host-maddrs", f"/ip4/127.0.0.1/tcp/{port}"]
    result = subprocess.run(python_module("bootstrap", *args), capture_output=True, text=True, timeout=30)
    assert result.returncode == 1, result.stderr + result.stdout
    assert f"/ip4/127.0.0.1/tcp/{port}" in result.stderr and "in use" in result.stderr, result.stderr
    assert proc.poll() is None


@pytest.mark.timeout(60)
def test_bad_flag_exits_2_naming_the_flag():
    result = subprocess.run(python_module("bootstrap", "--host-maddrs", "nonsense"),
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "--host-maddrs" in result.stderr and "nonsense" in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.timeout(60)
def test_unreachable_initial_peer_exits_1_naming_address_and_cause(tmp_path):
    dead_peer = f"/ip4/127.0.0.1/tcp/{_closed_port()}/p2p/{SOME_PEER_ID}"
    args = ["--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--initial-peers", dead_peer, "--startup-timeout-s", "3"]
    result = subprocess.run(python_module("bootstrap", *args), capture_output=True, text=True, timeout=30)
    assert result.returncode == 1, result.stderr
    assert dead_peer in result.stderr and "connection refused" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.timeout(90)
def test_the_bootstrap_refuses_a_record_forged_under_a_peers_subkey(bootstrap):
    """A victim peer and a forger without validators store under the victim's subkey through
    the bootstrap, then both leave: only the bootstrap holds the record, and a reader (a client:
    it keeps nothing itself) gets the victim's signed value from it."""
    _, join_address, _ = bootstrap()
    victim_id = identity()
    victim = create_dht(initial_peers=[join_address], host_maddrs=["/ip4/127.0.0.1/tcp/0"], identity=victim_id)
    forger = ChildSafeDHT(initial_peers=[join_address], host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True)
    reader = create_dht(initial_peers=[join_address], host_maddrs=["/ip4/127.0.0.1/tcp/0"], client_mode=True)
    key = swarm.peers_key("boot-run")
    try:
        honest = swarm.PeerRecord("x", "127.0.0.1:7001", 3, 1, 4, 0.0, False, False, 3, "abcd", get_dht_time(),
                                  swarm.WAIT).to_value()
        assert asyncio.run(swarm.store(victim, key, honest, 5.0))
        forged = {**honest, "addr": "203.0.113.66:1", "round": 99}
        forger.store(key, forged, get_dht_time() + swarm.RECORD_TTL_S + 5, subkey=records.owner_subkey(victim_id))
        victim.shutdown()
        forger.shutdown()
        got = asyncio.run(swarm.read_peers(reader, "boot-run", 5.0))
        assert {p: r.round for p, r in got.items()} == {victim_id.peer_id: 3}
    finally:
        for dht in (reader, forger, victim):
            dht.shutdown()
