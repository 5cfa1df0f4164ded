"""Which host a peer announces for gRPC, and what to warn about: never a loopback address to a
swarm whose initial peers are elsewhere, but the local address that routes to the first initial
peer when the flags do not say; a warning when the address is probably a container's own.
The choices are pure functions; the system reads they need (a UDP connect, which sends no
packet; the kernel's route tables; /.dockerenv) are separate, small and bounded."""

from __future__ import annotations

import concurrent.futures
import ipaddress
import os
import socket
import struct

WILDCARDS = ("", "0.0.0.0", "::", "[::]")
DOCKER_BRIDGES = ipaddress.ip_network("172.16.0.0/12")
RESOLVE_TIMEOUT_S = 3.0
_ROUTES_V4, _ROUTES_V6 = "/proc/net/route", "/proc/net/ipv6_route"


def maddr_host(maddr: str) -> str:
    """The host part of a multiaddr (/ip4/X/..., /ip6/X/..., /dns*/X/...), '' when it has none."""
    parts = maddr.split("/")
    if len(parts) > 2 and parts[1] in ("ip4", "ip6", "dns", "dns4", "dns6"):
        return parts[2]
    return ""


def join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def remote_swarm(initial_hosts: list[str]) -> bool:
    """True when some initial peer is not on this machine's loopback."""
    return any(h and not is_loopback(h) for h in initial_hosts)


def choose_host(bind_host: str, initial_hosts: list[str], route_src: str | None, visible: list[str]) -> str:
    """The host to announce for gRPC when --announce-addr does not say (it always wins):
    - the interface --host names, when it names one;
    - with initial peers: the local address that routes to the first one (`route_src`), never a
      loopback one when any initial peer is elsewhere (then the first other visible address);
    - a new run (no initial peers): the first visible address that is not loopback.
    '' when a swarm elsewhere could reach none of this machine's addresses."""
    if bind_host not in WILDCARDS:
        return bind_host
    routable = [h for h in visible if not is_loopback(h)]
    if not initial_hosts:
        return routable[0] if routable else "127.0.0.1"
    if not remote_swarm(initial_hosts):
        return route_src or "127.0.0.1"
    if route_src and not is_loopback(route_src):
        return route_src
    return routable[0] if routable else ""


def resolve(host: str, timeout_s: float = RESOLVE_TIMEOUT_S) -> str | None:
    """The first address of `host` (IPv4 first), None when it does not resolve within timeout_s
    (getaddrinfo has no deadline of its own: it runs in a thread that is left behind)."""
    try:
        return str(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        pass
    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="resolve")
    try:
        infos = pool.submit(socket.getaddrinfo, host, None, type=socket.SOCK_STREAM).result(timeout_s)
    except (OSError, concurrent.futures.TimeoutError):
        return None
    finally:
        pool.shutdown(wait=False)
    infos.sort(key=lambda info: info[0] != socket.AF_INET)
    return str(infos[0][4][0]) if infos else None


def route_source(peer_ip: str) -> str | None:
    """The local address the kernel would send from to reach `peer_ip` (a UDP connect: no
    packet leaves), None when there is no route."""
    family = socket.AF_INET6 if ":" in peer_ip else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect((peer_ip, 9))
            return str(s.getsockname()[0])
    except OSError:
        return None


def on_link(peer_ip: str, v4_routes: str, v6_routes: str = "") -> bool:
    """Whether `peer_ip` is on a directly attached network (a route without a gateway, not the
    default one), from the text of /proc/net/route and /proc/net/ipv6_route."""
    ip = ipaddress.ip_address(peer_ip)
    if ip.version == 4:
        for line in v4_routes.splitlines()[1:]:
            f = line.split()
            if len(f) < 8:
                continue
            dest, gateway, mask = (struct.unpack("<I", bytes.fromhex(x))[0] for x in (f[1], f[2], f[7]))
            if gateway == 0 and mask != 0 and int(ip) & mask == dest & mask:
                return True
        return False
    for line in v6_routes.splitlines():
        f = line.split()
        if len(f) < 10 or int(f[1], 16) == 0 or int(f[4], 16) != 0 or f[9] == "lo":
            continue
        if ip in ipaddress.ip_network(f"{ipaddress.ip_address(int(f[0], 16))}/{int(f[1], 16)}"):
            return True
    return False


def read_routes() -> tuple[str, str]:
    texts = []
    for path in (_ROUTES_V4, _ROUTES_V6):
        try:
            with open(path) as f:
                texts.append(f.read())
        except OSError:
            texts.append("")
    return texts[0], texts[1]


def in_container() -> bool:
    return os.path.exists("/.dockerenv") or os.path.exists("/run/.containerenv")


def container_hint(host: str, peer_ip: str | None, container: bool, peer_on_link: bool, port: int,
                   dht_port: int | None, announce_given: bool, dht_announce_given: bool) -> str:
    """A warning when the announced `host` is probably a container's internal address that the
    initial peer (at `peer_ip`, elsewhere: not on loopback, not on a network of ours) cannot reach;
    '' otherwise. It names the flags still missing."""
    if peer_ip is None or is_loopback(peer_ip) or peer_on_link or (announce_given and dht_announce_given):
        return ""
    try:
        bridge = ipaddress.ip_address(host.strip("[]")) in DOCKER_BRIDGES
    except ValueError:
        bridge = False
    if not (container or bridge):
        return ""
    why = "/.dockerenv exists" if container else f"{host} is in {DOCKER_BRIDGES}, Docker's bridge networks"
    fixes = []
    if not announce_given:
        fixes.append(f"--announce-addr PUBLIC_IP:{port or 'PORT'}")
    if not dht_announce_given:
        fixes.append(f"--dht-announce-maddrs /ip4/PUBLIC_IP/tcp/{dht_port or 'DHT_PORT'}")
    return (f"this peer seems to run in a container ({why}) and announces {host}, probably an address inside "
            f"the container's network that the initial peer at {peer_ip} cannot reach: publish the ports and pass "
            f"{' and '.join(fixes)}, or run the container with --network host")


def visible_hosts(maddrs: list[str]) -> list[str]:
    """The IPs in `maddrs`, loopback last."""
    hosts = []
    for maddr in maddrs:
        parts = maddr.split("/")
        if len(parts) > 2 and parts[1] in ("ip4", "ip6"):
            hosts.append(parts[2] if parts[1] == "ip4" else f"[{parts[2]}]")
    hosts.sort(key=is_loopback)
    return hosts


def dht_tcp_address(host: str, announced: list[str], visible: list[str]) -> str:
    """host:port at which others reach our DHT node over TCP: the first announced TCP multiaddr,
    else our announced host with the port the DHT listens on; '' when it has none."""
    for maddr in announced:
        parts = maddr.split("/")
        if len(parts) > 4 and parts[3] == "tcp" and maddr_host(maddr):
            return join_host_port(parts[2], int(parts[4]))
    for maddr in visible:
        parts = maddr.split("/")
        if len(parts) > 4 and parts[1] in ("ip4", "ip6") and parts[3] == "tcp":
            return join_host_port(host.strip("[]"), int(parts[4]))
    return ""
