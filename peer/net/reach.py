"""Reachability, on the network loop: the dial-back both ways (`ask` names the addresses this
peer announces to a serving peer; `DialBackService.handle` answers such a call by dialling
them, only on the host the call came from and one call per caller at a time), the verdict
(`judge`), the check before a round that turns an unreachable peer into a client-mode one
(`Reachability`), and the clock skew from a Health reply (`clock_offset_s`). Never blocks:
every dial and every call has a deadline."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import random
import re
import socket
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import unquote

import grpc
from hivemind.utils import get_dht_time

from peer._proto import peer_pb2 as pb
from peer._proto import peer_pb2_grpc
from peer.net.announce import join_host_port
from peer.net.client import CHANNEL_OPTIONS, Channels, Reject, describe_rpc_error, open_channel
from peer.net.loop import Deadline
from peer.net.signer import Signer
from peer.tlsfiles import TlsFiles

if TYPE_CHECKING:
    from peer.net.core import NetCore

log = logging.getLogger(__name__)
DIAL_TIMEOUT_S = 3.0       # per address dialled back, unless the caller asks for less
MAX_DIAL_TIMEOUT_S = 5.0   # the most a caller may ask for
ASK_SLACK_S = 2.0          # a DialBack call may take its dials' timeout plus this
MAX_TARGETS = 4            # addresses one DialBack may name
MAX_DIALS = 16             # dial-backs in flight at once, all callers together
ASK_PEERS = 3              # serving peers asked to dial us back before a round
MAX_CHECKS = 3             # checks that got no answer at all before we stop asking
# A fresh connection for every dial-back: not one of the cached channels, and not a connection
# gRPC's global subchannel pool shares between channels to the same address.
FRESH_OPTIONS = [*CHANNEL_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]
S = pb.DialResult
_HOSTPORT = re.compile(r"^(?:\[([0-9a-fA-F:.]+)\]|([A-Za-z0-9.\-]+)):(\d{1,5})$")


def split_host_port(address: str) -> tuple[str, int]:
    """host:port or [v6]:port -> (host, port); ValueError naming the address otherwise."""
    m = _HOSTPORT.match(address)
    if not m or not 0 < int(m.group(3)) < 65536:
        raise ValueError(f"{address!r} is not host:port (e.g. 203.0.113.5:7000)")
    return m.group(1) or m.group(2), int(m.group(3))


def normal_ip(text: str) -> str:
    """The canonical text of an IP address (an IPv4-mapped IPv6 one as IPv4); '' if not an IP."""
    try:
        ip = ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return ""
    mapped = getattr(ip, "ipv4_mapped", None)
    return str(mapped or ip)


def caller_host(peer: str) -> str:
    """The IP in a gRPC peer string (`ipv4:10.0.0.5:4123`, `ipv6:%5B::1%5D:4123`); '' for any other
    transport (unix sockets)."""
    kind, _, rest = unquote(peer).partition(":")
    if kind not in ("ipv4", "ipv6"):
        return ""
    return normal_ip(rest.rsplit(":", 1)[0])


# ---- the callee: dialling back ---------------------------------------------------------------
async def _resolve(host: str, port: int, timeout_s: float) -> list[str]:
    if normal_ip(host):
        return [normal_ip(host)]
    infos = await asyncio.wait_for(asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM),
                                   timeout_s)
    return sorted({normal_ip(str(info[4][0])) for info in infos})


async def dial(address: str, caller: str, expect_peer: str, is_grpc: bool, timeout_s: float,
               signer: Signer, tls: TlsFiles | None = None) -> pb.DialResult:
    """Tries to reach `address` now, on `caller`'s host only: a TCP connect, then for a gRPC
    address a Health call over a fresh connection (TLS with `tls`) whose peer id must be `expect_peer`."""
    started, deadline = time.monotonic(), Deadline(timeout_s)

    def result(status: int, detail: str, answered_by: str = "") -> pb.DialResult:
        return pb.DialResult(address=address, grpc=is_grpc, status=status, detail=detail,
                             ms=1000 * (time.monotonic() - started), answered_by=answered_by)

    host, port = split_host_port(address)
    try:
        ips = await _resolve(host, port, deadline.left())
    except (OSError, asyncio.TimeoutError) as e:
        return result(S.DNS, f"{host} does not resolve ({getattr(e, 'strerror', None) or 'no answer in time'})")
    if caller not in ips:
        named = host if ips == [host] else f"{host} ({', '.join(ips)})"
        return result(S.NOT_CALLER, f"{named} is not {caller}, the host this call came from")
    target = join_host_port(caller, port)
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(caller, port), deadline.left())
        writer.close()
    except ConnectionRefusedError:
        return result(S.REFUSED, f"connection refused at {target}")
    except asyncio.TimeoutError:
        return result(S.TIMEOUT, f"no answer from {target} within {timeout_s:.1f} s")
    except OSError as e:
        return result(S.UNREACHABLE, f"{e.strerror or e} connecting to {target}")
    if not is_grpc:
        return result(S.OK, f"TCP connection to {target} accepted")
    channel = open_channel(target, signer, FRESH_OPTIONS, tls)
    try:
        health = await peer_pb2_grpc.PeerStub(channel).Health(pb.HealthRequest(), timeout=deadline.left(0.05))
    except grpc.aio.AioRpcError as e:
        if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            return result(S.TIMEOUT, f"{target} accepts connections but Health did not answer within {timeout_s:.1f} s")
        if "refused" in (e.details() or ""):
            return result(S.REFUSED, f"connection refused at {target}")
        return result(S.NOT_A_PEER, f"{target} accepts connections but answers no diloco Health "
                                    f"({describe_rpc_error(e)})")
    finally:
        await channel.close(None)
    if health.peer_id != expect_peer:
        return result(S.WRONG_PEER, f"peer {health.peer_id[-6:] or '?'} answered at {target}, not {expect_peer[-6:]}",
                      health.peer_id)
    return result(S.OK, f"peer {health.peer_id[-6:]} answered Health at {target}", health.peer_id)


class DialBackService:
    """The callee's side. Trusts no stranger: dials only the host the call came from (others
    are answered NOT_CALLER, undialled), one call per caller host at a time, at most MAX_DIALS
    at once and MAX_TARGETS addresses a call, each within MAX_DIAL_TIMEOUT_S."""

    def __init__(self, signer: Signer, tls: TlsFiles | None = None):
        self.signer, self.tls, self.peer_id = signer, tls, signer.identity.peer_id
        self.busy: set[str] = set()   # caller hosts being dialled now (touched on the loop only)

    async def handle(self, req: pb.DialBackRequest, peer: str) -> pb.DialBackReply:
        caller = caller_host(peer)
        if not caller:
            raise Reject(grpc.StatusCode.PERMISSION_DENIED, f"dial-back answers TCP/IP callers only, not {peer}")
        targets = ([(req.grpc_address, True)] if req.grpc_address else []) + [(a, False) for a in req.tcp_addresses]
        if not targets or len(targets) > MAX_TARGETS:
            raise Reject(grpc.StatusCode.INVALID_ARGUMENT,
                         f"name 1 to {MAX_TARGETS} addresses to dial back, not {len(targets)}")
        for address, _ in targets:
            try:
                split_host_port(address)
            except ValueError as e:
                raise Reject(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        if req.grpc_address and not req.peer_id:
            raise Reject(grpc.StatusCode.INVALID_ARGUMENT, "a gRPC address to dial back needs the caller's peer id")
        if caller in self.busy:
            raise Reject(grpc.StatusCode.RESOURCE_EXHAUSTED, f"a dial-back to {caller} is running; ask again after it")
        if len(self.busy) >= MAX_DIALS:
            raise Reject(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{MAX_DIALS} dial-backs are running; ask again later")
        timeout_s = req.timeout_s if math.isfinite(req.timeout_s) and req.timeout_s > 0 else DIAL_TIMEOUT_S
        timeout_s = min(max(timeout_s, 0.1), MAX_DIAL_TIMEOUT_S)
        self.busy.add(caller)
        try:
            results = await asyncio.gather(*(dial(a, caller, req.peer_id, g, timeout_s, self.signer, self.tls)
                                             for a, g in targets))
        finally:
            self.busy.discard(caller)
        return pb.DialBackReply(peer_id=self.peer_id, caller_host=caller, results=results)


# ---- the caller: asking, judging ----------------------------------------------------------------
async def ask(channels: Channels, address: str, me: str, grpc_address: str, tcp_addresses: list[str] = (),
              timeout_s: float = DIAL_TIMEOUT_S) -> pb.DialBackReply:
    """Asks the peer at `address` to dial ours back; raises grpc.aio.AioRpcError."""
    req = pb.DialBackRequest(peer_id=me, grpc_address=grpc_address, tcp_addresses=list(tcp_addresses),
                             timeout_s=timeout_s)
    return await channels.stub(address).DialBack(req, timeout=timeout_s + ASK_SLACK_S)


@dataclass(frozen=True)
class Verdict:
    reachable: bool | None   # None: nobody could be asked (not checked)
    line: str                # what to log
    dht_line: str = ""       # a warning about the plain TCP addresses (the DHT port), or ""


def _failure(peer_id: str, r: pb.DialResult) -> str:
    verb = "did not dial" if r.status == S.NOT_CALLER else "could not connect"
    return f"{peer_id[-6:]} {verb}: {r.detail} ({r.ms:.0f} ms)"


def judge(address: str, answers: dict[str, pb.DialBackReply | str], fixed_port: bool) -> Verdict:
    """What the answers of the peers asked (peer id -> reply, or why the call failed) say about
    `address`: reachable when one of them reached it (Health with our id), not reachable when
    some answered and none did, unchecked when none answered."""
    replies = {p: a for p, a in answers.items() if not isinstance(a, str)}
    if not replies:
        return Verdict(None, "reachability not checked: could not ask " + "; ".join(
            f"{p[-6:]} ({a})" for p, a in sorted(answers.items())))
    grpc_results = {p: next((r for r in a.results if r.grpc), None) for p, a in replies.items()}
    ok = sorted((r.ms, p) for p, r in grpc_results.items() if r is not None and r.status == S.OK)
    tcp = [(p, r) for p, a in replies.items() for r in a.results if not r.grpc]
    dht_line = ""
    if tcp and not any(r.status == S.OK for _, r in tcp):
        dht_line = ("the DHT port is not reachable from other peers either (" + "; ".join(_failure(p, r) for p, r in tcp)
                    + "): open it inbound, or pass --dht-announce-maddrs with the address that reaches it")
    if ok:
        ms, p = ok[0]
        return Verdict(True, f"reachable at {address} (dialled back by {p[-6:]} in {ms:.0f} ms)", dht_line)
    port = address.rsplit(":", 1)[-1]
    failures = [_failure(p, r) for p, r in sorted(grpc_results.items()) if r is not None]
    seen = sorted({a.caller_host for p, a in replies.items()
                   if grpc_results[p] is not None and grpc_results[p].status == S.NOT_CALLER})
    fix = (f"To serve shards and lead rounds, this peer must accept TCP connections on port {port}: open it inbound "
           f"(firewall, cloud security group), publish it from a container with -p {port}:{port}"
           f"{'' if fixed_port else ' (pick a fixed --port first)'}, or forward it on your router and pass "
           f"--announce-addr PUBLIC_IP:{port}; or start with --client-mode, which skips this check")
    if seen:
        fix += (f". The other peers see this machine as {', '.join(seen)}: if port {port} reaches it there, pass "
                f"--announce-addr {seen[0]}:{port}")
    return Verdict(False, f"not reachable at {address}: {'; '.join(failures)}. Continuing in client mode (sends and "
                          f"fetches, owns no shard, never leads, announces no address) so that no round waits on "
                          f"this peer. {fix}", dht_line)


def others_first(records: list, address: str) -> list:
    """`records` (anything with an `addr`, host:port) with those on another host than `address`
    first, each part in its order: a peer on this very machine that dials us back says nothing
    about the way in from outside, nor does a link test to it measure the link."""
    host = address.rsplit(":", 1)[0]
    return sorted(records, key=lambda r: bool(host) and r.addr.rsplit(":", 1)[0] == host)


class Reachability:
    """Asks up to ASK_PEERS serving peers to dial this peer's announced address back, once the
    view holds some (core.begin_round calls `settle` before each round until it is settled).
    Unreachable: core.client_mode from then on. Touched on the loop only."""

    def __init__(self) -> None:
        self.settled = False
        self.checks = 0
        self.said_alone = False

    async def settle(self, core: NetCore) -> None:
        if self.settled or core.client_mode:
            return
        serving = [r for r in core.live_peers() if r.addr and not r.client]
        if not serving:
            if not self.said_alone:
                log.info("reachability of %s is not checked yet: no other serving peer to ask (it is once one "
                         "joins)", core.address)
                self.said_alone = True
            return
        self.checks += 1
        random.shuffle(serving)
        chosen = [(r.peer_id, r.addr) for r in others_first(serving, core.address)[:ASK_PEERS]]
        tcp = [core.dht_address] if core.dht_address else []

        async def one(peer_id: str, addr: str) -> pb.DialBackReply | str:
            try:
                return await ask(core.channels, addr, core.peer_id, core.address, tcp)
            except grpc.aio.AioRpcError as e:
                return describe_rpc_error(e)

        replies = await asyncio.gather(*(one(p, a) for p, a in chosen))
        answers = {p: a for (p, _), a in zip(chosen, replies, strict=True)}
        verdict = judge(core.address, answers, core.cfg.port != 0)
        if verdict.dht_line:
            log.warning("%s", verdict.dht_line)
        if verdict.reachable is None:
            self.settled = self.checks >= MAX_CHECKS
            log.warning("%s%s", verdict.line, "; not asking again" if self.settled else "; asking again next round")
            return
        self.settled = True
        if verdict.reachable:
            log.info("%s", verdict.line)
            return
        log.warning("%s", verdict.line)
        core.client_mode = True   # our next record (begin_round publishes one next) has no address


# ---- clock skew --------------------------------------------------------------------------------
def clock_offset_s(sent: float, received: float, remote: float) -> float:
    """How far the remote clock is ahead of ours: its time when it answered minus the midpoint
    of our call (sent and received on our clock); the error is at most half the round trip."""
    return remote - (sent + received) / 2


@dataclass(frozen=True)
class ClockSample:
    offset_s: float   # remote clock minus ours
    rtt_s: float      # the round trip of the call: the offset is within +-rtt_s/2


async def clock_sample(stub: peer_pb2_grpc.PeerStub, timeout_s: float) -> ClockSample | None:
    """One Health call timed on our DHT clock; None when the peer does not send its time."""
    sent = get_dht_time()
    health = await stub.Health(pb.HealthRequest(), timeout=timeout_s)
    received = get_dht_time()
    if health.time <= 0:
        return None
    return ClockSample(clock_offset_s(sent, received, health.time), received - sent)
