"""Real links for tests and benchmarks: one network namespace per host, each joined by a veth
pair to a bridge in a dedicated "switch" namespace, addresses 10.77.0.x/24, and tbf rate caps
per direction. Touches nothing outside the namespaces it creates, and deletes them all again.

    with Topology() as topo:
        boot = topo.add_host("bootstrap")
        a = topo.add_host("a", up_mbit=100, down_mbit=100)
        proc = topo.start(a, [sys.executable, "-c", "..."], None, "a.log")

A host's upload cap is a tbf on the egress of its own veth end (inside the host's namespace),
its download cap a tbf on the egress of the bridge-side end (inside the switch namespace).
Traffic from a host to its own address stays on its `lo` and is not capped.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from tests.procs import start_proc
from tests.swarm.harness import Swarm

SUBNET = "10.77.0"
BRIDGE = "br0"
HOST_IF = "eth0"            # a host's end of its veth pair, inside its namespace
TBF_LATENCY_MS = 50         # the most a packet may wait in a tbf queue (its `limit` follows)
BURST_MS = 10               # bucket depth: this many milliseconds of traffic at the rate
MIN_BURST_BYTES = 32_000 // 8    # 32 kbit: the least burst a tbf is given


class LinksUnavailable(RuntimeError):
    """Namespaces cannot be made here (not root, `ip`/`tc` missing, netns refused); says why."""


def _run(*argv: str) -> None:
    p = subprocess.run(list(argv), capture_output=True, text=True, timeout=30)
    if p.returncode != 0:
        raise RuntimeError(f"`{' '.join(argv)}` failed ({p.returncode}): {p.stderr.strip() or p.stdout.strip()}")


def tbf_args(rate_mbit: float) -> list[str]:
    """tbf parameters for one direction: burst = BURST_MS of traffic at the rate (at least
    32 kbit); `latency` bounds the queue, so the kernel sizes `limit` as rate * latency + burst."""
    burst_bytes = max(MIN_BURST_BYTES, int(rate_mbit * 1e6 / 8 * BURST_MS / 1000))
    return ["rate", f"{rate_mbit}mbit", "burst", str(burst_bytes), "latency", f"{TBF_LATENCY_MS}ms"]


def check_available() -> None:
    """Raises LinksUnavailable when this machine cannot build a Topology (never for anything else)."""
    if os.geteuid() != 0:
        raise LinksUnavailable("network namespaces need root")
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        raise LinksUnavailable(f"{' and '.join(missing)} not installed (iproute2)")


@dataclass(frozen=True)
class Host:
    name: str
    ns: str           # network namespace
    ip: str           # its address on the bridge, 10.77.0.x
    up_mbit: float | None
    down_mbit: float | None

    def maddr(self) -> str:
        """A DHT listen address on this host, free port."""
        return f"/ip4/{self.ip}/tcp/0"


class Topology:
    """Namespaces of one test run, named `<prefix>-<random>-<host>` so that leftovers of a run
    that was killed never collide. `close()` (or leaving the `with`) deletes every namespace
    this object made, whatever state it is in; kill the processes inside them first."""

    def __init__(self, prefix: str = "dl"):
        check_available()
        self.tag = f"{prefix}{secrets.token_hex(3)}"
        self.switch = f"{self.tag}-switch"
        self.hosts: dict[str, Host] = {}
        self._namespaces: list[str] = []
        try:
            self._add_ns(self.switch)
        except RuntimeError as e:
            raise LinksUnavailable(f"cannot create a network namespace: {e}") from None
        try:
            _run("ip", "-n", self.switch, "link", "add", BRIDGE, "type", "bridge")
            _run("ip", "-n", self.switch, "link", "set", BRIDGE, "up")
        except BaseException:
            self.close()
            raise

    def _add_ns(self, ns: str) -> None:
        _run("ip", "netns", "add", ns)
        self._namespaces.append(ns)
        _run("ip", "-n", ns, "link", "set", "lo", "up")

    def add_host(self, name: str, up_mbit: float | None = None, down_mbit: float | None = None) -> Host:
        """A namespace with address 10.77.0.(n+1) on the bridge; None = that direction uncapped."""
        if name in self.hosts:
            raise ValueError(f"host {name} exists already")
        index = len(self.hosts) + 1
        if index > 250:
            raise ValueError("at most 250 hosts on 10.77.0.0/24")
        host = Host(name, f"{self.tag}-{name}", f"{SUBNET}.{index}", up_mbit, down_mbit)
        self._add_ns(host.ns)
        port = f"p{index}"   # the bridge-side end, in the switch namespace
        _run("ip", "-n", self.switch, "link", "add", port, "type", "veth", "peer", "name", HOST_IF,
             "netns", host.ns)
        _run("ip", "-n", self.switch, "link", "set", port, "master", BRIDGE)
        _run("ip", "-n", self.switch, "link", "set", port, "up")
        _run("ip", "-n", host.ns, "addr", "add", f"{host.ip}/24", "dev", HOST_IF)
        _run("ip", "-n", host.ns, "link", "set", HOST_IF, "up")
        if up_mbit:
            _run("tc", "-n", host.ns, "qdisc", "add", "dev", HOST_IF, "root", "tbf", *tbf_args(up_mbit))
        if down_mbit:
            _run("tc", "-n", self.switch, "qdisc", "add", "dev", port, "root", "tbf", *tbf_args(down_mbit))
        self.hosts[name] = host
        return host

    def refuse_inbound(self, host: Host) -> None:
        """The host's namespace refuses every TCP connection made to it from the bridge (a SYN
        gets a reset: `connection refused`), as a home router or a firewall does; its own
        connections out, and their answers, pass. LinksUnavailable without iptables."""
        if shutil.which("iptables") is None:
            raise LinksUnavailable("iptables not installed (scripts/system_deps.sh installs it)")
        _run("ip", "netns", "exec", host.ns, "iptables", "-A", "INPUT", "-i", HOST_IF, "-p", "tcp", "--syn",
             "-j", "REJECT", "--reject-with", "tcp-reset")

    def argv(self, host: Host, argv: list[str]) -> list[str]:
        """`argv` run inside the host's namespace (`ip netns exec` execs it: same pid)."""
        return ["ip", "netns", "exec", host.ns, *argv]

    def start(self, host: Host, argv: list[str], env: dict[str, str] | None, log_path: str | os.PathLike,
              **kwargs) -> subprocess.Popen:
        """tests.procs.start_proc inside the host's namespace: log file, our process group."""
        return start_proc(self.argv(host, argv), env, log_path, **kwargs)

    def run(self, host: Host, argv: list[str], timeout_s: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(host, argv), capture_output=True, text=True, timeout=timeout_s)

    def close(self) -> None:
        """Deletes every namespace made here (with them their veth ends and qdiscs); never raises
        for one that is gone already. A namespace with a live process stays until it exits."""
        errors = []
        for ns in reversed(self._namespaces):
            p = subprocess.run(["ip", "netns", "del", ns], capture_output=True, text=True, timeout=30)
            if p.returncode != 0 and Path(f"/run/netns/{ns}").exists():
                errors.append(f"{ns}: {p.stderr.strip()}")
        self._namespaces.clear()
        self.hosts.clear()
        if errors:
            raise RuntimeError("could not delete namespaces: " + "; ".join(errors))

    def __enter__(self) -> Topology:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class NetSwarm(Swarm):
    """tests/swarm/harness.py's Swarm with every process on its own host of `topo`: peers listen
    on their namespace's address (DHT and gRPC), one torch thread each. A host is made at a
    process's first start with the caps given then (default: `up_mbit`/`down_mbit` of the swarm;
    the bootstrap node uncapped); a restarted name reuses its host."""

    def __init__(self, root: Path, run_args: list[str], topo: Topology, up_mbit: float | None = 100,
                 down_mbit: float | None = 100):
        super().__init__(root, run_args)
        self.topo, self.up_mbit, self.down_mbit = topo, up_mbit, down_mbit

    def host(self, name: str, up_mbit: float | None = None, down_mbit: float | None = None) -> Host:
        if name not in self.topo.hosts:
            default = (None, None) if name == "bootstrap" else (self.up_mbit, self.down_mbit)
            self.topo.add_host(name, up_mbit or default[0], down_mbit or default[1])
        return self.topo.hosts[name]

    def start_peer(self, name: str, extra: list[str] = (), env: dict | None = None, join: bool = True,
                   up_mbit: float | None = None, down_mbit: float | None = None):
        self.host(name, up_mbit, down_mbit)
        return super().start_peer(name, extra, env, join)

    def host_args(self, name: str) -> list[str]:
        ip = self.host(name).ip
        return ["--dht-host-maddrs", f"/ip4/{ip}/tcp/0", "--host", ip, "--threads", "1"]

    def bootstrap_maddr(self) -> str:
        return self.host("bootstrap").maddr()

    def launch(self, name: str, argv: list[str], env: dict | None):
        proc = self.topo.start(self.host(name), argv, {"OMP_NUM_THREADS": "1", **(env or {})},
                               self.root / f"{name}.log")
        self.procs[name] = proc
        return proc

    def close(self, grace_s: float = 15) -> None:
        """SIGTERM to every process at once, SIGKILL to those still up `grace_s` later, then
        deletes the namespaces (a namespace goes only when its last process has exited)."""
        try:
            live = [p for p in self.procs.values() if p.poll() is None]
            for proc in live:
                proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + grace_s
            for proc in live:
                try:
                    proc.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)
        finally:
            self.topo.close()
