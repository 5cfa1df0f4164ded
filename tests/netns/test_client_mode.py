"""Peers behind a firewall that refuses inbound TCP connections (tests/links.py: one network
namespace per host, 100 Mbit/s tbf caps each way; `Topology.refuse_inbound` makes a host's
namespace answer every SYN from the bridge with a reset, checked below with a real connect).

One swarm of the `tiny` preset, 4 peers with `--min-peers 4`: `a` (starts the run) and `b` on
normal hosts, `c` with `--client-mode` and `d` without it, both on refusing hosts. `b` is dialled
back and logs `reachable at`; `d` is not, logs what failed and what to do, and continues in client
mode; `c` never asks. Both `c` and `d` contribute (their ids among a round's contributors) and
never own a shard or lead a round; no state round has two digests.
"""

from __future__ import annotations

import re
import sys

import pytest

from tests.links import LinksUnavailable, NetSwarm, Topology
from tests.procs import wait_for_line

pytestmark = pytest.mark.timeout(300)

RUN = ["--model", "tiny", "--target-steps", "300", "--min-peers", "4", "--batch-size", "4", "--eval-batches", "1",
       "--run-id", "client-mode"]
ROUNDS = 4
LISTENS = r"gRPC server listens on (\S+):(\d+)"


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    try:
        topo = Topology()
    except LinksUnavailable as e:
        pytest.skip(f"no network namespaces here: {e}")
    swarm = NetSwarm(tmp_path_factory.mktemp("client-mode"), RUN, topo)
    try:
        for name in ("c", "d"):
            try:
                topo.refuse_inbound(swarm.host(name))
            except LinksUnavailable as e:
                pytest.skip(f"cannot refuse inbound connections: {e}")
        swarm.start_bootstrap()
        first = swarm.start_peer("a")
        wait_for_line(first, r"started run client-mode", 60)   # the run's state comes from a serving peer
        swarm.start_peer("b")
        swarm.start_peer("c", ["--client-mode"])
        swarm.start_peer("d")
        for name in ("a", "b", "c", "d"):
            swarm.wait_rounds(name, ROUNDS, 180)
        yield swarm
    finally:
        swarm.close()


def connect(swarm: NetSwarm, from_host: str, to: str) -> str:
    """A real TCP connect from `from_host`'s namespace to the gRPC port `to` listens on: 'ok' or the error."""
    ip, port = re.search(LISTENS, swarm.log(to)).groups()
    code = (f"import socket\ntry:\n    socket.create_connection(({ip!r}, {port}), 3).close(); print('ok')\n"
            f"except OSError as e:\n    print(type(e).__name__)")
    return swarm.topo.run(swarm.host(from_host), [sys.executable, "-c", code]).stdout.strip()


def ids(swarm: NetSwarm) -> dict[str, str]:
    return {name: swarm.metrics(name)[0]["peer_id"] for name in ("a", "b", "c", "d")}


def test_the_firewalled_hosts_refuse_connections(swarm):
    assert connect(swarm, "a", "b") == "ok", "a normal host accepts connections to a peer's port"
    assert connect(swarm, "a", "c") == "ConnectionRefusedError"
    assert connect(swarm, "b", "d") == "ConnectionRefusedError"


def test_reachable_peers_say_so_and_an_unreachable_one_falls_back_to_client_mode(swarm):
    ip, port = re.search(LISTENS, swarm.log("b")).groups()
    assert re.search(rf"reachable at {re.escape(ip)}:{port} \(dialled back by \w{{6}} in \d+ ms\)", swarm.log("b"))
    ip, port = re.search(LISTENS, swarm.log("d")).groups()
    line = re.search(rf"WARN .*not reachable at {re.escape(ip)}:{port}: .*", swarm.log("d"))
    assert line, swarm.log("d")[-3000:]
    for words in ("could not connect: connection refused", "Continuing in client mode", f"port {port}",
                  "--announce-addr PUBLIC_IP:", "--client-mode"):
        assert words in line.group(0), f"{words!r} not in {line.group(0)}"
    assert "reachab" not in swarm.log("c"), "a --client-mode peer asks nobody to dial it"
    assert "announced as nothing (client mode)" in swarm.log("c")


def test_client_mode_peers_contribute_and_never_own_or_lead(swarm):
    peer = ids(swarm)
    rows = [row for name in ("a", "b", "c", "d") for row in swarm.metrics(name)]
    for name in ("c", "d"):
        mine = [r for r in swarm.metrics(name) if r["outcome"] == "applied" and peer[name] in r["contributors"]]
        assert mine, f"{name} contributed to no round: {[(r['round'], r['outcome']) for r in swarm.metrics(name)]}"
        assert all(r["group_size"] >= 3 for r in mine), "it trained with the others"
        assert not [r["round"] for r in rows if peer[name] in r["owners"] or r["leader"] == peer[name]], \
            f"{name} owned a shard or led a round"
    assert any(set(r["owners"]) == {peer["a"], peer["b"]} for r in rows if r["group_size"] == 4)
    split = swarm.split_states(("a", "b", "c", "d"))
    assert not split, f"state rounds with two digests: {split}"
