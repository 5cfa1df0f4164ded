"""`peer doctor` across network namespaces (tests/links.py): a host whose firewall rejects
inbound connections to the gRPC port the doctor is asked about gets a FAIL naming that port and
what to do (exit 1); the same host with nothing blocked passes (exit 0)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest

from tests.links import LinksUnavailable, NetSwarm, Topology

RUN = ["--model", "tiny", "--target-steps", "40", "--max-round-seconds", "20", "--batch-size", "4",
       "--eval-batches", "1", "--run-id", "doctor-netns"]
PORT = 47011
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    if shutil.which("iptables") is None:
        pytest.skip("iptables is not installed (scripts/system_deps.sh installs it as root)")
    try:
        topo = Topology("dr")
    except LinksUnavailable as e:
        pytest.skip(str(e))
    s = NetSwarm(tmp_path_factory.mktemp("doctor-netns"), RUN, topo)
    try:
        s.start_bootstrap()
        s.start_peer("a")
        s.wait_rounds("a", 1, 120)
        s.doctor_host = topo.add_host("d", up_mbit=50, down_mbit=50)
        yield s
    finally:
        s.close()


def run_doctor(net, *extra: str) -> subprocess.CompletedProcess:
    host = net.doctor_host
    return net.topo.run(host, [sys.executable, "-m", "peer.cli", "doctor", "--initial-peers", net.bootstrap_addr,
                               "--run-id", "doctor-netns", "--host", host.ip, "--port", str(PORT),
                               "--dht-host-maddrs", f"/ip4/{host.ip}/tcp/0", *extra], timeout_s=150)


def iptables(net, *rule: str) -> None:
    p = net.topo.run(net.doctor_host, ["iptables", *rule])
    assert p.returncode == 0, p.stderr


def test_blocked_grpc_port_is_named(net):
    rule = ["INPUT", "-p", "tcp", "--dport", str(PORT), "--syn", "-j", "REJECT", "--reject-with", "tcp-reset"]
    iptables(net, "-A", *rule)
    try:
        p = run_doctor(net)
    finally:
        iptables(net, "-D", *rule)
    out = p.stdout
    print(out)
    assert p.returncode == 1, out + p.stderr[-3000:]
    assert f"[FAIL] gRPC port {net.doctor_host.ip}:{PORT} is not reachable from peer" in out, out
    assert "refused" in out and f"open TCP port {PORT} inbound" in out
    assert "[  ok] DHT port" in out, "only the gRPC port was blocked"
    assert "verdict: NOT REACHABLE from outside" in out


def test_nothing_blocked_passes(net):
    p = run_doctor(net)
    out = p.stdout
    print(out)
    assert p.returncode == 0, out + p.stderr[-3000:]
    assert f"[  ok] gRPC port {net.doctor_host.ip}:{PORT} reachable from peer" in out
    assert "[  ok] clock" in out and "[  ok] link" in out
    link = next(line for line in out.splitlines() if "] link" in line)
    down, up = (float(x) for x in re.findall(r"(?:down|up) ([\d.]+) Mbit/s", link))
    assert 5 < down <= 55 and 5 < up <= 55, f"the host's link is capped at 50 Mbit/s each way: {link}"
    assert "verdict: OK" in out
