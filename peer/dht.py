"""Starting hivemind's DHT so that its process and p2pd die with ours, and small read-only queries on it.
Owns no records and no validators (callers pass those); every call that waits on the DHT takes a deadline."""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import errno
import gc
import ipaddress
import logging
import os
import re
import select
import signal
import socket
import sys
import time
from collections.abc import Iterable
from functools import partial

import hivemind
import torch.multiprocessing
from hivemind.dht.validation import RecordValidatorBase
from hivemind.utils.multiaddr import Multiaddr

from peer import records
from peer.identity import Identity
from peer.net.announce import maddr_host, remote_swarm

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None
_PROBE_TIMEOUT_S = 3.0
SHUTDOWN_TIMEOUT_S = 3.0  # for the DHT process to stop (DHTNode.shutdown stops p2pd)


class DHTStartError(RuntimeError):
    """The DHT node did not start or could not join the swarm; the message says through what and why."""


class DuplicateIdentity(DHTStartError):
    """Another running peer has our peer id (a key file used twice): exit status 3."""


def _die_with_parent(expected_parent_pid: int) -> None:
    """Ask Linux to SIGKILL this process when the thread that forked it exits (no-op elsewhere)."""
    if _PRCTL is not None and _PRCTL(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != expected_parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def _p2pd_preexec(parent_pid: int) -> None:
    """In the forked p2pd, before exec (uvloop runs preexec_fn too): die with the DHT process, and leave
    the terminal's process group: Ctrl-C reaches only the peer, which stops its children itself. The
    DHT process ignores SIGTERM and SIGINT, p2pd must not (hivemind stops it with SIGTERM): libuv resets
    them in the child, asyncio's own loop would not."""
    os.setpgid(0, 0)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    _die_with_parent(parent_pid)


def _spawn_dying_with_parent(original, *args, **kwargs):
    kwargs.setdefault("preexec_fn", partial(_p2pd_preexec, os.getpid()))
    return original(*args, **kwargs)


class ChildSafeDHT(hivemind.DHT):
    """hivemind.DHT whose forked process, and the p2pd it spawns, are SIGKILLed when their parent dies.
    PR_SET_PDEATHSIG fires when the *thread* that forked exits: create it from the main thread (the DHT
    process runs its event loop, which spawns p2pd, in its own main thread).

    The DHT process ignores SIGTERM and SIGINT: a signal to the whole process group (Ctrl-C, systemd's
    stop, `kill -- -PGID`) reaches it with its parent, which still needs it to say goodbye to the swarm;
    the parent stops it with `shutdown` (SIGKILL after a deadline), and it dies with the parent anyway."""

    identity: Identity | None = None   # set by create_dht: the key this node signs its records with
    member_key: bytes = b""   # a private run's: the proof its records carry (peer.records; set by run.py,
    #                           in this process only, after the fork: the DHT process never holds it)

    def run(self) -> None:  # runs in the forked DHT process
        # objects inherited from the parent are never collected here: garbage it left (a closed gRPC
        # channel, say) would run its finalizer in a child whose gRPC threads did not fork, and crash it
        gc.freeze()
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # neither the handler our parent may have installed
        signal.signal(signal.SIGINT, signal.SIG_IGN)   # nor the default: see the class docstring
        _die_with_parent(self._parent_pid)  # hivemind records the creator's pid in __init__
        asyncio.subprocess.create_subprocess_exec = partial(
            _spawn_dying_with_parent, asyncio.subprocess.create_subprocess_exec
        )
        super().run()

    def shutdown(self, timeout_s: float = SHUTDOWN_TIMEOUT_S) -> None:
        """Asks the DHT process to stop (it stops p2pd) and waits at most timeout_s, then SIGKILLs it
        (p2pd follows it). Never blocks longer: not on a full pipe to a stuck process either."""
        if not self.is_alive():
            return
        try:  # a message this small is written at once or not at all (PIPE_BUF) once the pipe is writable
            if select.select([], [self._outer_pipe], [], min(timeout_s, 1.0))[1]:
                self._outer_pipe.send(("_shutdown", [], {}))
            self._outer_pipe.close()  # a straggling call now fails at once instead of waiting on a dead process
        except (OSError, ValueError) as e:  # the pipe is broken or closed: the process is going away
            logger.debug("asking the DHT process to stop: %s", e)
        self.join(timeout_s)
        if self.is_alive():
            logger.warning("the DHT process did not stop within %.1f s; killing it", timeout_s)
            self.kill()
            self.join(1.0)


def parse_maddr(value: str, *, need_peer_id: bool = False, need_port: bool = False) -> Multiaddr:
    """Parse one multiaddr string; ValueError names the string and what was expected."""
    example = "/ip4/203.0.113.1/tcp/31337" + ("/p2p/<peer id>" if need_peer_id else "")
    try:
        maddr = Multiaddr(value)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{value!r} is not a multiaddr ({e}); expected something like {example}") from None
    if need_peer_id and "p2p" not in maddr:
        raise ValueError(f"{value!r} has no /p2p/<peer id> part; expected something like {example}")
    if need_port and any(proto in maddr and maddr[proto] == "0" for proto in ("tcp", "udp")):
        raise ValueError(f"{value!r} has port 0; an announced address needs the real port")
    return maddr


def _probe(maddr: str, timeout_s: float) -> str:
    """Open (and close) a TCP connection to an initial peer; say what happened, in words."""
    parsed = Multiaddr(maddr)
    host_proto = next((p for p in ("ip4", "ip6", "dns", "dns4", "dns6") if p in parsed), None)
    if host_proto is None or "tcp" not in parsed:
        return "not a TCP address, not probed"
    host, port = parsed[host_proto], int(parsed["tcp"])
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        return f"DNS lookup of {host} failed ({e.strerror})"
    ip = min(infos, key=lambda info: info[0] != socket.AF_INET)[4][0]  # IPv4 first
    try:
        with socket.create_connection((ip, port), timeout=timeout_s):
            return "TCP port open, but no DHT node with this peer id answered"
    except ConnectionRefusedError:
        return f"connection refused at {ip}:{port}"
    except TimeoutError:
        return f"timeout after {timeout_s:.0f} s connecting to {ip}:{port}"
    except OSError as e:
        return f"{e.strerror or e} connecting to {ip}:{port}"


def _check_port_free(maddr: str) -> None:
    """libp2p listens with SO_REUSEPORT, so a second node on a busy port would share it silently."""
    parsed = Multiaddr(maddr)
    proto = next((p for p in ("ip4", "ip6") if p in parsed), None)
    if proto is None or "tcp" not in parsed or parsed["tcp"] == "0":
        return
    with socket.socket(socket.AF_INET if proto == "ip4" else socket.AF_INET6) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is fine, a listener is not
        try:
            sock.bind((parsed[proto], int(parsed["tcp"])))
        except OSError as e:
            hint = " (another process listens on this port)" if e.errno == errno.EADDRINUSE else ""
            raise DHTStartError(f"cannot listen on {maddr}: {e.strerror}{hint}") from None


def _start_shm_manager_deaf_to_stop_signals() -> None:
    """hivemind shares tensors (its futures' state) with torch's file_system strategy, for which torch
    starts torch_shm_manager on the first shared tensor. systemd's stop signals every process of the
    unit, and a manager gone before us makes our next free of a shared tensor abort (SIGABRT, 'Broken
    pipe'). Started with SIGTERM and SIGINT blocked, it inherits the mask; it ends by itself once its
    clients are gone. A signal that comes meanwhile waits for the unblock."""
    if torch.multiprocessing.get_sharing_strategy() != "file_system":
        return
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    try:
        torch.empty(1).share_memory_()  # starts the manager once per process
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def _start_once(timeout_s: float, **dht_kwargs) -> ChildSafeDHT:
    """One attempt; on failure the DHT process is gone (p2pd follows it) and hivemind's error is raised."""
    dht = ChildSafeDHT(start=False, startup_timeout=max(timeout_s, 1.0), **dht_kwargs)
    try:  # also a signal (Interrupted) right after the fork: the process must not outlive this call
        dht.start()
        dht.wait_until_ready(timeout=timeout_s)
    except BaseException as e:
        if dht.pid is not None:  # forked
            if isinstance(e, Exception):  # after a reported failure it exits by itself, stopping p2pd
                dht.join(timeout=1.0)
            if dht.is_alive():  # or a signal came: nothing will stop it but us
                dht.kill()
                dht.join(timeout=1.0)
        if isinstance(e, concurrent.futures.TimeoutError):
            raise DHTStartError(f"the DHT process was not ready within {timeout_s:.0f} s") from None
        raise
    return dht


def _describe(error: Exception) -> str:
    text = re.sub(r"\d{4}/\d\d/\d\d \d\d:\d\d:\d\d ", "", str(error))  # p2pd's Go timestamps
    return text.split(" (set ensure_bootstrap_success")[0] or type(error).__name__


def create_dht(
    *, initial_peers: list[str], host_maddrs: list[str], announce_maddrs: list[str] | None = None,
    client_mode: bool = False, startup_timeout_s: float = 30.0,
    record_validators: Iterable[RecordValidatorBase] = (), identity: Identity | None = None,
) -> ChildSafeDHT:
    """Start a DHT node (from the main thread, before any other thread) and wait until it is ready.

    Every attempt offers hivemind all initial peers (IPv4 first); a failure to join is retried with
    backoff until startup_timeout_s, and each initial peer is probed to say why (DNS, refused, timeout).
    The node's peer id is `identity`'s (a fresh key when None): p2pd reads it from its key file, or
    from a private temporary copy, removed once the node runs, for a key held in memory. The node
    signs its records with that key and checks everyone's (`peer.records.validators`, plus
    `record_validators`); `dht.identity` is the key `swarm.store` writes under.
    Raises ValueError for a malformed address, DHTStartError when the node cannot start.
    """
    identity = identity or Identity.generate()
    validators = [*records.validators(identity), *record_validators]
    if identity.path:  # p2pd first checks that no running peer has this id (a copied key file: DuplicateIdentity)
        dht = _create(initial_peers, host_maddrs, announce_maddrs, identity.path, client_mode, startup_timeout_s,
                      validators, check_free=True)
    else:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="diloco-id-") as folder:
            dht = _create(initial_peers, host_maddrs, announce_maddrs, identity.write_temp(folder), client_mode,
                          startup_timeout_s, validators, check_free=False)   # a new key is nobody's yet
    dht.identity = identity
    return dht


def _create(initial_peers: list[str], host_maddrs: list[str], announce_maddrs: list[str] | None,
            identity_path: str, client_mode: bool, startup_timeout_s: float,
            record_validators: list[RecordValidatorBase], check_free: bool) -> ChildSafeDHT:
    peers = [str(parse_maddr(p, need_peer_id=True)) for p in initial_peers]
    peers.sort(key=lambda p: not p.startswith("/ip4/"))  # stable: IPv4 first, else the caller's order
    hosts = [str(parse_maddr(m)) for m in host_maddrs]
    announce = [str(parse_maddr(m, need_port=True)) for m in announce_maddrs] if announce_maddrs else None
    for host in hosts:
        _check_port_free(host)
    _start_shm_manager_deaf_to_stop_signals()
    kwargs = dict(initial_peers=peers, host_maddrs=hosts, announce_maddrs=announce, identity_path=identity_path,
                  client_mode=client_mode, record_validators=record_validators, check_if_identity_free=check_free)
    deadline = time.monotonic() + startup_timeout_s
    backoff_s, attempt = 0.5, 0
    while True:
        attempt += 1
        try:
            return _start_once(max(deadline - time.monotonic(), 0.1), **kwargs)
        except Exception as e:
            error = _describe(e)
        if "is already taken by another peer" in error:
            raise DuplicateIdentity(f"another running peer has this peer's id (its key file {identity_path} was "
                                    "copied or is used twice): each peer needs its own --identity-file (or "
                                    "--checkpoint-dir); stop the other one or give this one another file")
        if not peers or not re.search(r"bootstrap|initial_peers|not ready within", error):
            raise DHTStartError(f"could not start the DHT node on {', '.join(hosts)}: {error}")
        probe_timeout_s = min(_PROBE_TIMEOUT_S, max(deadline - time.monotonic(), 0.1))
        probes = "; ".join(f"{peer}: {_probe(peer, probe_timeout_s)}" for peer in peers)
        if deadline - time.monotonic() <= backoff_s:
            raise DHTStartError(f"could not join the DHT through any initial peer within {startup_timeout_s:.0f} s "
                                f"({attempt} attempts): {probes}. Last error from hivemind: {error}")
        logger.warning("attempt %d to join the DHT failed (%s): %s; retrying in %.1f s", attempt, error, probes, backoff_s)
        time.sleep(backoff_s)
        backoff_s = min(backoff_s * 2, 4.0)


def _address_rank(maddr: str) -> tuple[int, int, str]:
    """Sort key: public before private before loopback; IPv4 before the rest."""
    parsed = Multiaddr(maddr)
    proto = next((p for p in ("ip4", "ip6") if p in parsed), None)
    if proto is None:
        return (1, 1, maddr)
    ip = ipaddress.ip_address(parsed[proto])
    return (2 if ip.is_loopback else 1 if ip.is_private or ip.is_link_local else 0, proto != "ip4", maddr)


def _call(dht: hivemind.DHT, coro, timeout_s: float):
    """Run coro(dht, node) in the DHT process; concurrent.futures.TimeoutError after timeout_s."""
    future = dht.run_coroutine(coro, return_future=True)
    try:
        return future.result(timeout=timeout_s)
    except concurrent.futures.TimeoutError:
        future.cancel()
        raise


async def _visible_maddrs(_dht: hivemind.DHT, node: hivemind.DHTNode) -> list[Multiaddr]:
    return await node.get_visible_maddrs(latest=True)


def join_addresses(dht: hivemind.DHT, timeout_s: float = 10.0, initial_peers: Iterable[str] = ()) -> list[str]:
    """Full multiaddrs (/ip4/../tcp/../p2p/<id>) others can join through, public first; loopback ones
    only when they are all we have (a node bound to 127.0.0.1) and no initial peer is elsewhere: a
    swarm on other machines gets none (maybe no address at all). TimeoutError after timeout_s."""
    ranked = sorted({str(m) for m in _call(dht, _visible_maddrs, timeout_s)}, key=_address_rank)
    routable = [m for m in ranked if _address_rank(m)[0] < 2]
    if remote_swarm([maddr_host(p) for p in initial_peers]):
        return routable
    return routable or ranked


async def _routing_table_size(_dht: hivemind.DHT, node: hivemind.DHTNode, refresh: bool) -> int:
    if refresh:  # a lookup contacts peers, and the routing table drops those that do not answer
        await node.get(f"heartbeat_{os.urandom(8).hex()}", latest=True)
    return len(node.protocol.routing_table.uid_to_peer_id)


def count_dht_peers(dht: hivemind.DHT, timeout_s: float, refresh: bool = False) -> int:
    """Number of other peers in the local routing table; concurrent.futures.TimeoutError after timeout_s.
    With refresh, first look up a random key (as hivemind's run_dht does) so that dead peers drop out."""
    return _call(dht, partial(_routing_table_size, refresh=refresh), timeout_s)
