"""Reachability over real gRPC servers in one process (a peer's own servicer and core on
127.0.0.1): DialBack reaches a peer's announced address over a fresh connection and says how
each address failed (refused, not a peer, timed out, another peer, DNS, not the caller's
host); it dials one call per caller at a time; the check before a round keeps a reachable peer
serving and turns an unreachable one into a client-mode one; Health carries the peer's clock.
And the pure choices: which host to announce, when to warn about a container, the verdict."""

from __future__ import annotations

import asyncio
import logging
import socket

import grpc
import pytest
from hivemind.utils import get_dht_time

from peer._proto import peer_pb2 as pb
from peer.config import ConfigError, PeerConfig, RunSpec, validate_peer
from peer.net import announce, reach, swarm
from peer.net.core import NetCore
from peer.net.server import start_server
from tests.fixtures import channels as signed_channels
from tests.fixtures import identity, pump

pytestmark = pytest.mark.timeout(60)
S = pb.DialResult
SPEC = RunSpec(model="tiny")


async def serving(name: str) -> tuple[NetCore, grpc.aio.Server]:
    core = NetCore(None, PeerConfig(run_id="reach"), identity())  # type: ignore[arg-type]  # no DHT: views are set by the test
    core.spec, core.spec_hash = SPEC, SPEC.hash()
    server, port = await start_server(core, "127.0.0.1", 0)
    core.address = f"127.0.0.1:{port}"
    return core, server


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def record(core: NetCore) -> swarm.PeerRecord:
    return swarm.PeerRecord(core.peer_id, core.address, 0, 0, 0, 0.0, False, core.client_mode, 0, core.spec_hash,
                            get_dht_time(), swarm.WAIT)


class Counting:
    """A TCP proxy in front of `upstream` that counts the connections made to it."""

    def __init__(self, upstream_port: int):
        self.upstream_port, self.connections = upstream_port, 0
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._pipe, "127.0.0.1", 0)
        return f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _pipe(self, reader, writer) -> None:
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.close()
            return

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))


def test_dial_back_reaches_the_caller_over_a_fresh_connection_and_names_each_failure():
    async def body():
        caller, s1 = await serving("caller-peer")
        callee, s2 = await serving("callee-peer")
        other, s3 = await serving("other-peer")
        proxy = Counting(int(caller.address.rsplit(":", 1)[1]))
        proxied = await proxy.start()
        silent = await asyncio.start_server(lambda r, w: asyncio.sleep(30), "127.0.0.1", 0)
        http1 = await asyncio.start_server(_http1, "127.0.0.1", 0)
        silent_addr = f"127.0.0.1:{silent.sockets[0].getsockname()[1]}"
        http1_addr = f"127.0.0.1:{http1.sockets[0].getsockname()[1]}"
        channels = signed_channels()
        try:
            await callee.channels.stub(proxied).Health(pb.HealthRequest(), timeout=5)  # a cached connection
            assert proxy.connections == 1
            ok = await reach.ask(caller.channels, callee.address, caller.peer_id, proxied, [f"localhost:{closed_port()}"])
            assert ok.peer_id == callee.peer_id and ok.caller_host == "127.0.0.1"
            g, t = ok.results
            assert (g.grpc, g.status, g.answered_by) == (True, S.OK, caller.peer_id) and g.ms > 0, g
            assert proxy.connections == 3, "a TCP connect and a fresh gRPC connection, not the cached channel"
            assert (t.grpc, t.status) == (False, S.REFUSED) and "connection refused" in t.detail, t

            cases = {f"127.0.0.1:{closed_port()}": S.REFUSED, other.address: S.WRONG_PEER,
                     http1_addr: S.NOT_A_PEER, "nonexistent.invalid:7000": S.DNS, "10.1.2.3:7000": S.NOT_CALLER}
            for address, status in cases.items():
                r = (await reach.ask(caller.channels, callee.address, caller.peer_id, address)).results[0]
                assert r.status == status, f"{address}: {r}"
            wrong = (await reach.ask(caller.channels, callee.address, caller.peer_id, other.address)).results[0]
            assert wrong.answered_by == other.peer_id and "not " + caller.peer_id[-6:] in wrong.detail
            stranger = (await reach.ask(caller.channels, callee.address, caller.peer_id, "10.1.2.3:7000")).results[0]
            assert "not 127.0.0.1, the host this call came from" in stranger.detail and stranger.ms < 1000

            timed = (await reach.ask(caller.channels, callee.address, caller.peer_id, silent_addr, timeout_s=0.5)).results[0]
            assert timed.status == S.TIMEOUT and 400 < timed.ms < 2000, timed
            tcp_only = await reach.ask(caller.channels, callee.address, caller.peer_id, "", [silent_addr])
            assert [(r.grpc, r.status) for r in tcp_only.results] == [(False, S.OK)]
        finally:
            await channels.close()
            for c in (caller, callee, other):
                await c.channels.close()
            for s in (s1, s2, s3):
                await s.stop(None)
            for srv in (proxy.server, silent, http1):
                srv.close()

    asyncio.run(body())


async def _http1(reader, writer) -> None:
    await reader.read(10)
    writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
    await writer.drain()
    writer.close()


def test_one_dial_back_per_caller_at_a_time_and_bad_requests_refused():
    async def body():
        callee, server = await serving("callee-peer")
        silent = await asyncio.start_server(lambda r, w: asyncio.sleep(30), "127.0.0.1", 0)
        silent_addr = f"127.0.0.1:{silent.sockets[0].getsockname()[1]}"
        channels = signed_channels()
        me = channels.signer.identity.peer_id
        try:
            first = asyncio.ensure_future(reach.ask(channels, callee.address, me, silent_addr, timeout_s=1.0))
            await asyncio.sleep(0.2)
            with pytest.raises(grpc.aio.AioRpcError) as busy:
                await reach.ask(channels, callee.address, me, callee.address)
            assert busy.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "127.0.0.1" in busy.value.details()
            assert (await first).results[0].status == S.TIMEOUT
            after = await reach.ask(channels, callee.address, me, callee.address)
            assert after.results[0].status == S.WRONG_PEER, "the caller may ask again once its dial-back ended"
            for grpc_address, tcp, why in [("", [], "1 to 4 addresses"), ("a:1", ["b:1"] * 4, "1 to 4 addresses"),
                                           ("no-port", [], "is not host:port")]:
                with pytest.raises(grpc.aio.AioRpcError) as bad:
                    await reach.ask(channels, callee.address, me, grpc_address, tcp)
                assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT and why in bad.value.details()
        finally:
            await channels.close()
            await callee.channels.close()
            await server.stop(None)
            silent.close()

    asyncio.run(body())


def test_the_check_keeps_a_reachable_peer_serving_and_an_unreachable_one_in_client_mode(caplog):
    caplog.set_level(logging.INFO, logger="peer.net.reach")

    async def body():
        a, sa = await serving("peer-aaaaaa")
        b, sb = await serving("peer-bbbbbb")
        lone, sl = await serving("peer-lone00")
        hidden, sh = await serving("peer-hidden")
        hidden.address = f"127.0.0.1:{closed_port()}"   # what it announces does not reach its server
        try:
            await lone.reach.settle(lone)   # nobody to ask: not checked, still serving
            assert not lone.reach.settled and not lone.client_mode
            await lone.reach.settle(lone)
            assert caplog.text.count("is not checked yet") == 1, "said once"

            for c in (b, hidden):
                c.view = {a.peer_id: record(a)}
            await b.reach.settle(b)
            assert b.reach.settled and not b.client_mode
            assert f"reachable at {b.address} (dialled back by {a.peer_id[-6:]} in" in caplog.text

            await hidden.reach.settle(hidden)
            assert hidden.reach.settled and hidden.client_mode
            assert hidden.record().addr == "" and hidden.record().client
            assert all(p != hidden.peer_id for p, _ in hidden.candidates(0, set())), "never a leader"
            line = next(r.getMessage() for r in caplog.records if "not reachable" in r.getMessage())
            port = hidden.address.rsplit(":", 1)[1]
            for words in (f"not reachable at {hidden.address}", f"{a.peer_id[-6:]} could not connect: connection refused",
                          "client mode", f"TCP connections on port {port}", f"-p {port}:{port}", "--announce-addr PUBLIC_IP:", "--client-mode"):
                assert words in line, f"{words!r} not in: {line}"
        finally:
            for c, s in ((a, sa), (b, sb), (lone, sl), (hidden, sh)):
                await c.channels.close()
                await s.stop(None)

    asyncio.run(body())


def test_health_carries_the_clock_for_the_skew():
    async def body():
        core, server = await serving("clock-peer")
        channels = signed_channels()
        try:
            sample = await reach.clock_sample(channels.stub(core.address), 5)
            assert sample is not None and 0 <= sample.rtt_s < 5
            assert abs(sample.offset_s) <= sample.rtt_s / 2 + 0.01, "one clock: the offset is within the round trip"
        finally:
            await channels.close()
            await server.stop(None)

    asyncio.run(body())
    assert reach.clock_offset_s(sent=100.0, received=102.0, remote=105.0) == 4.0


def _reply(caller: str, *results: pb.DialResult) -> pb.DialBackReply:
    return pb.DialBackReply(peer_id="x", caller_host=caller, results=list(results))


def test_the_verdict_names_who_could_not_connect_how_and_what_to_do():
    ok = S(address="10.0.0.5:7000", grpc=True, status=S.OK, ms=3.2)
    refused = S(address="10.0.0.5:7000", grpc=True, status=S.REFUSED, detail="connection refused at 10.0.0.5:7000",
                ms=1.0)
    dht_refused = S(address="10.0.0.5:4000", grpc=False, status=S.REFUSED, detail="refused", ms=1.0)
    v = reach.judge("10.0.0.5:7000", {"peer-111111": _reply("10.0.0.5", refused),
                                      "peer-222222": _reply("10.0.0.5", ok)}, True)
    assert v.reachable and v.line == "reachable at 10.0.0.5:7000 (dialled back by 222222 in 3 ms)"
    v = reach.judge("10.0.0.5:7000", {"peer-111111": _reply("10.0.0.5", refused, dht_refused),
                                      "peer-222222": "UNAVAILABLE: down"}, False)
    assert v.reachable is False and "111111 could not connect: connection refused" in v.line and "pick a fixed --port" in v.line
    assert "DHT port" in v.dht_line
    nat = S(address="192.168.1.5:7000", grpc=True, status=S.NOT_CALLER, detail="192.168.1.5 is not 203.0.113.9")
    v = reach.judge("192.168.1.5:7000", {"peer-111111": _reply("203.0.113.9", nat)}, True)
    assert v.reachable is False and "--announce-addr 203.0.113.9:7000" in v.line
    v = reach.judge("10.0.0.5:7000", {"peer-111111": "UNIMPLEMENTED", "peer-222222": "DEADLINE_EXCEEDED"}, True)
    assert v.reachable is None and "not checked" in v.line and "111111 (UNIMPLEMENTED)" in v.line


def test_the_announced_host_is_never_loopback_for_a_swarm_elsewhere():
    visible = ["192.168.1.5", "10.8.0.2", "127.0.0.1"]
    assert announce.choose_host("10.8.0.2", ["203.0.113.5"], "192.168.1.5", visible) == "10.8.0.2", "--host says"
    assert announce.choose_host("0.0.0.0", ["203.0.113.5"], "10.8.0.2", visible) == "10.8.0.2", "routes there"
    assert announce.choose_host("0.0.0.0", ["203.0.113.5"], "127.0.0.1", visible) == "192.168.1.5"
    assert announce.choose_host("0.0.0.0", ["203.0.113.5"], None, ["127.0.0.1"]) == "", "nothing routable"
    assert announce.choose_host("0.0.0.0", ["127.0.0.1"], "127.0.0.1", visible) == "127.0.0.1", "a local swarm"
    assert announce.choose_host("0.0.0.0", [], None, visible) == "192.168.1.5", "a new run"
    assert announce.choose_host("::", [], None, ["127.0.0.1"]) == "127.0.0.1"
    assert announce.route_source("127.0.0.1") == "127.0.0.1"
    assert announce.maddr_host("/dns4/boot.example.org/tcp/31337/p2p/Qm") == "boot.example.org"
    assert announce.remote_swarm(["localhost", "127.0.0.1"]) is False
    assert announce.remote_swarm(["127.0.0.1", "boot.example.org"]) is True


ROUTES = """Iface	Destination	Gateway 	Flags	RefCnt	Use	Metric	Mask		MTU	Window	IRTT
eth0	00000000	010011AC	0003	0	0	0	00000000	0	0	0
eth0	000011AC	00000000	0001	0	0	0	0000FFFF	0	0	0
"""
ROUTES6 = ("fd000000000000000000000000000000 40 00000000000000000000000000000000 00 "
           "00000000000000000000000000000000 00000100 00000001 00000000 00000001     eth0\n")


def test_a_container_internal_address_is_warned_about():
    assert announce.on_link("172.17.0.3", ROUTES) and not announce.on_link("203.0.113.5", ROUTES)
    assert announce.on_link("fd00::7", "", ROUTES6) and not announce.on_link("2001:db8::1", "", ROUTES6)
    hint = announce.container_hint("172.17.0.2", "203.0.113.5", False, False, 7000, 4000, False, False)
    assert "172.17.0.2" in hint and "--announce-addr PUBLIC_IP:7000" in hint and "/tcp/4000" in hint
    assert "--network host" in hint
    inside = announce.container_hint("10.0.0.2", "203.0.113.5", True, False, 0, None, True, False)
    assert "/.dockerenv" in inside and "--announce-addr" not in inside and "--dht-announce-maddrs" in inside
    for args in [("172.17.0.2", "172.17.0.3", True, True), ("10.0.0.2", "203.0.113.5", False, False),
                 ("127.0.0.1", "127.0.0.1", True, False)]:
        assert announce.container_hint(*args, 7000, 4000, False, False) == "", args
    assert announce.container_hint("172.17.0.2", "203.0.113.5", True, False, 7000, 4000, True, True) == ""


def test_addresses_that_cannot_work_are_refused_before_joining():
    remote = ("/ip4/203.0.113.5/tcp/31337/p2p/12D3KooWJtMwoydwm5Qu2ZPWAD2aGhj5YsVd8KxPWb2wgPwyfFyM",)
    with pytest.raises(ConfigError, match="--client-mode needs --initial-peers"):
        validate_peer(PeerConfig(client_mode=True))
    with pytest.raises(ConfigError, match="--host 127.0.0.1 listens on loopback only.*203.0.113.5"):
        validate_peer(PeerConfig(host="127.0.0.1", initial_peers=remote))
    validate_peer(PeerConfig(host="127.0.0.1", initial_peers=remote, announce_addr="203.0.113.9:7000"))
    validate_peer(PeerConfig(host="127.0.0.1", initial_peers=remote, client_mode=True))
    validate_peer(PeerConfig(host="127.0.0.1", initial_peers=(remote[0].replace("203.0.113.5", "127.0.0.1"),)))


def test_join_through_lines_are_never_loopback_for_a_swarm_elsewhere():
    from peer.dht import create_dht, join_addresses

    dht = create_dht(initial_peers=[], host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    try:
        local = join_addresses(dht)
        assert local and all(a.startswith("/ip4/127.0.0.1/") for a in local), "all it has, for a local swarm"
        far = ["/ip4/203.0.113.5/tcp/31337/p2p/12D3KooWJtMwoydwm5Qu2ZPWAD2aGhj5YsVd8KxPWb2wgPwyfFyM"]
        assert join_addresses(dht, initial_peers=far) == []
        assert join_addresses(dht, initial_peers=[local[0]]) == local
    finally:
        dht.shutdown()


def test_peers_on_other_hosts_are_asked_first():
    """A peer on this very machine (the doctor run next to a peer) proves nothing about the way
    in from outside: the dial-back and the link test go to peers elsewhere when there are any."""
    def rec(name: str, addr: str) -> swarm.PeerRecord:
        return swarm.PeerRecord(name, addr, 0, 0, 0, 0.0, False, False, 0, "h", get_dht_time(), swarm.WAIT)

    here1, there1, here2, there2 = (rec("here-1", "10.0.0.2:7000"), rec("there-1", "10.0.0.1:7000"),
                                    rec("here-2", "10.0.0.2:7100"), rec("there-2", "10.0.0.10:7000"))
    ordered = reach.others_first([here1, there1, here2, there2], "10.0.0.2:7200")
    assert [r.peer_id for r in ordered] == ["there-1", "there-2", "here-1", "here-2"]
    assert reach.others_first([here1, here2], "10.0.0.2:7200") == [here1, here2], "only local ones: still asked"
    assert reach.others_first([here1, there1], "") == [here1, there1], "no address of ours: order kept"
    v6 = [rec("v6-here", "[2001:db8::2]:7000"), rec("v6-there", "[2001:db8::1]:7000")]
    assert [r.peer_id for r in reach.others_first(v6, "[2001:db8::2]:7100")] == ["v6-there", "v6-here"]
