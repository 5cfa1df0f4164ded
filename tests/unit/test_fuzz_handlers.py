"""Every RPC handler fuzzed over a real gRPC server: one peer (a NetCore without a DHT; its view is
set here) leads rounds and owns one of their two shards, with a state to serve and an update log;
members with real keys send it over signed channels ROUNDS x PER_ROUND structured hostile messages
(tests/fuzz_cases.py) while each round is in progress, then the round's honest parts close its shard.
Checked: every call ends with an expected status (never UNKNOWN: a handler that raised), each case's
own expectation (what validation must refuse is refused), no error or traceback in the server's log,
each reduced shard holds exactly the parts that were accepted and their mean (no dropped part, none
of a forged header, none sent late), Progress reports cannot move the leader's tally past the target
plus UNGRANTED_STEPS a member, the server still answers Health, and its resident memory grows by
less than RSS_GROWTH_MB after the first round, with at most 4 rounds and MAX_TASKS tasks held.
Run with -s for the table of calls per RPC and kind."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from collections import Counter, defaultdict

import grpc
import psutil
import pytest
import torch
from hivemind.utils import get_dht_time

from peer._proto import peer_pb2 as pb
from peer._proto import peer_pb2_grpc
from peer.codecs import get_codec
from peer.config import PeerConfig, RunSpec
from peer.net import owner, swarm, validate
from peer.net.client import CHANNEL_OPTIONS, EndedEarly, open_channel, sent
from peer.net.core import NetCore, RoundCtx
from peer.net.limits import CallerLimits
from peer.net.round import LeaderGroup, make_roster
from peer.net.server import start_server
from peer.net.signer import Signer
from peer.net.state_sync import StateSnapshot
from peer.outer import GlobalState
from tests.fixtures import identity
from tests.fuzz_cases import EXPECTED, Case, World
from tests.fuzz_rpcs import STREAMING_IN, STREAMING_OUT, generate

pytestmark = pytest.mark.timeout(280)
SEED, ROUNDS, PER_ROUND, AT_ONCE = 10, 20, 510, 48
FIRST_ROUND = 1000              # the peer leads every round: nobody else with an address is in its view
NUMEL = 2 * 4096                # two shards of 4096 values
RSS_GROWTH_MB = 150             # resident memory the server may gain after the first round (seen: 5-25)
MAX_TASKS = 500                 # tasks left when the last call ended (seen: 90-160, long polls the server
#                                 ends at their deadline a little after the caller gave up)
TARGET = 200                    # the run's target steps a round
BIG_OPTIONS = [(k, -1 if k == "grpc.max_send_message_length" else v) for k, v in CHANNEL_OPTIONS]


class BadLogs(logging.Handler):
    """Keeps every log record at ERROR or with a traceback: a handler that failed unexpectedly."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.bad: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR or record.exc_info:
            self.bad.append(f"{record.name}: {record.getMessage()[:300]}"
                            + (f"\n{logging.Formatter().formatException(record.exc_info)[-1500:]}" if record.exc_info else ""))


class Peer:
    """The fuzzed peer and what the test knows of its rounds."""

    def __init__(self, core: NetCore, address: str, members, other, strangers):
        self.core, self.address = core, address
        self.members, self.other, self.strangers = members, other, strangers

    def refresh_view(self) -> None:
        """Fresh signed records of the members, as the DHT would give them (client mode, training)."""
        c, now = self.core, get_dht_time()
        c.view = {m.peer_id: swarm.PeerRecord(m.peer_id, "", c.round, 10, 40, 0.0, True, True, c.round, c.spec_hash,
                                              now, swarm.TRAIN) for m in self.members}

    def begin(self, r: int, before: World | None) -> World:
        """Round r in progress here: its closed group (we lead it), its roster, our shard open."""
        c = self.core
        c.round, c.training, c.rate = r, True, 10.0
        c.gc_rounds()
        def member(pid, address="", client=True):
            return pb.Member(peer_id=pid, address=address, weight=10.0, samples=40, client_mode=client,
                             carried_round=-1, upload_bps=1e6)
        members = [member(c.peer_id, self.address, False), member(self.other.peer_id, "127.0.0.1:1", False)]
        roster = make_roster(r, c.peer_id, members + [member(m.peer_id) for m in self.members], "fp32", NUMEL)
        ctx = c.rounds[r] = RoundCtx(r)
        ctx.roster.set_result(roster)
        ctx.group = LeaderGroup(r, c.peer_id, "fp32", NUMEL)
        ctx.group.roster.set_result(roster)
        owner.own_shards(c, ctx, roster)
        self.refresh_view()
        mine = list(roster.owners).index(c.peer_id)
        return World(c.run_id, c.spec_hash, r, roster, c.peer_id, self.members, self.other, self.strangers,
                     c.snapshot.header.sha256, (r - 4, r - 1), mine, 1 - mine, before)


def serving_core() -> NetCore:
    core = NetCore(None, PeerConfig(run_id="fuzz", timeout_floor_s=120.0), identity())  # type: ignore[arg-type]
    core.spec = RunSpec(model="tiny", codec="fp32", target_steps=TARGET)
    core.spec_hash, core.numel = core.spec.hash(), NUMEL
    core.limits = CallerLimits(peer=(1e6, 1e6, 4096), host=(1e6, 1e6, 4096))   # every call reaches its handler
    return core


def serve_history(core: NetCore, r: int) -> None:
    """A state of round r to download and the update log of the 4 rounds before it."""
    g = torch.Generator().manual_seed(r)
    state = GlobalState(torch.randn(NUMEL, generator=g), torch.zeros(NUMEL), r, 1000 * r)
    core.held.put(StateSnapshot.of(state, core.spec_hash))
    core.updates.clear()
    for k in range(r - 4, r):
        payload = get_codec("fp32").encode(torch.randn(NUMEL, generator=g))
        core.updates.add(k, True, "fp32", [0, NUMEL], [payload], 40, f"digest-{k}")


class Sender:
    """Sends cases over signed channels (one per identity; another without the client's size bound)."""

    def __init__(self, address: str):
        self.address = address
        self.channels: dict[tuple[str, bool], grpc.aio.Channel] = {}
        self.plain = grpc.aio.insecure_channel(address, options=BIG_OPTIONS)

    def stub(self, case: Case) -> peer_pb2_grpc.PeerStub:
        key = (case.who.peer_id, case.big)
        if key not in self.channels:
            self.channels[key] = open_channel(self.address, Signer(case.who), BIG_OPTIONS if case.big else CHANNEL_OPTIONS)
        return peer_pb2_grpc.PeerStub(self.channels[key])

    async def send(self, case: Case) -> tuple[grpc.StatusCode, object]:
        try:
            if case.raw:
                return grpc.StatusCode.OK, await self.send_raw(case)
            method = getattr(self.stub(case), case.rpc)
            if case.rpc in STREAMING_IN:
                async def stream():
                    for message in case.request:
                        yield message
                return grpc.StatusCode.OK, await sent(method(stream(), timeout=case.timeout_s))
            if case.rpc in STREAMING_OUT:
                return grpc.StatusCode.OK, [m async for m in method(case.request, timeout=case.timeout_s)]
            return grpc.StatusCode.OK, await method(case.request, timeout=case.timeout_s)
        except grpc.aio.AioRpcError as e:
            return e.code(), e.details()
        except EndedEarly as e:   # grpc.aio's race (peer.net.client.sent): refused while we wrote
            return grpc.StatusCode.CANCELLED, str(e)

    async def send_raw(self, case: Case):
        """Bytes as the request (signed over them, or not signed, or a signed call sent twice)."""
        name = f"/diloco.Peer/{case.rpc}"
        md = () if case.raw == "unsigned" else Signer(case.who).metadata(name, case.request)
        ident = lambda b: b   # noqa: E731

        async def once():
            if case.rpc in STREAMING_IN:
                call = self.plain.stream_unary(name, request_serializer=ident)
                return await sent(call(iter([case.request]), metadata=md, timeout=case.timeout_s))
            if case.rpc in STREAMING_OUT:
                return [m async for m in self.plain.unary_stream(name, request_serializer=ident)(
                    case.request, metadata=md, timeout=case.timeout_s)]
            return await self.plain.unary_unary(name, request_serializer=ident)(case.request, metadata=md,
                                                                                 timeout=case.timeout_s)

        if case.raw == "replay":   # the first call may be answered anything; its replay is refused
            try:
                await once()
            except grpc.aio.AioRpcError:
                pass
        return await once()

    async def close(self) -> None:
        for ch in [*self.channels.values(), self.plain]:
            await ch.close(None)


class Tally:
    """What the calls did: statuses per (rpc, kind), failures, the parts each round's shard took."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str], Counter] = defaultdict(Counter)
        self.failures: list[str] = []
        self.accepted: set[str] = set()   # senders whose part of our shard was accepted this round
        self.refused: set[str] = set()    # ... whose part was dropped for its values (accepted=False)

    def record(self, w: World, case: Case, code: grpc.StatusCode, reply) -> None:
        self.counts[(case.rpc, case.kind)][code.name] += 1
        if code == grpc.StatusCode.CANCELLED and case.rpc in STREAMING_IN:
            # the server ended a stream we were still writing (a refusal whose status grpc.aio lost,
            # peer.net.client.sent): it passes only where a refusal passes
            why = case.expect(grpc.StatusCode.INVALID_ARGUMENT, str(reply))
        else:
            why = "" if code in EXPECTED else f"status {code.name}: {reply!s:.300}"
            why = why or case.expect(code, reply)
        if why:
            self.failures.append(f"round {w.round}: {case.rpc}/{case.kind} from {case.who.peer_id[-6:]}: {why} "
                                 f"(status {code.name}: {reply!s:.200}; request {case.request!s:.300})")
        if case.rpc == "Contribute" and not case.raw and code == grpc.StatusCode.OK:
            h = case.request[0].header
            if h.round == w.round and h.shard == w.mine and not h.backup and reply.accepted:
                self.accepted.add(h.sender)
            elif h.round == w.round and h.shard == w.mine and "non-finite" in reply.reason:   # dropped for its values
                self.refused.add(h.sender)

    def table(self) -> str:
        rows = [f"{'rpc':<11} {'kind':<17} {'calls':>6}  statuses"]
        for (rpc, kind), c in sorted(self.counts.items()):
            rows.append(f"{rpc:<11} {kind:<17} {sum(c.values()):>6}  "
                        + ", ".join(f"{k} {v}" for k, v in c.most_common()))
        per_rpc = Counter()
        for (rpc, _), c in self.counts.items():
            per_rpc[rpc] += sum(c.values())
        rows.append("per rpc: " + ", ".join(f"{k} {v}" for k, v in sorted(per_rpc.items())))
        return "\n".join(rows)


async def run_case(sender: Sender, tally: Tally, w: World, case: Case) -> None:
    for c in [case, *case.then]:
        code, reply = await sender.send(c)
        tally.record(w, c, code, reply)


async def fuzz_round(peer: Peer, sender: Sender, tally: Tally, w: World, rng: random.Random) -> None:
    """PER_ROUND cases, AT_ONCE of them in flight; the members' records kept fresh meanwhile."""
    slots = asyncio.Semaphore(AT_ONCE)

    async def one(case: Case) -> None:
        try:
            await run_case(sender, tally, w, case)
        finally:
            slots.release()

    tasks = []
    for i in range(PER_ROUND):
        await slots.acquire()
        if i % AT_ONCE == 0:
            peer.refresh_view()
        tasks.append(asyncio.ensure_future(one(generate(rng, w))))
    await asyncio.gather(*tasks)


async def close_round(peer: Peer, sender: Sender, w: World, tally: Tally) -> None:
    """The honest parts not in yet arrive (ours in-process, as a member's own shard); the shard
    reduces; it must hold exactly the accepted parts, and their mean."""
    c = peer.core
    shard = c.rounds[w.round].owned[w.mine]
    assert tally.refused <= set(shard.refused), f"round {w.round}: the shard still waits for a dropped part"
    late = [m for m in [*peer.members, peer.other] if m.peer_id not in shard.parts | shard.refused.keys()
            and m.peer_id not in tally.refused]
    for m in late:
        payload = w.payload(m.peer_id, w.mine)
        case = Case("Contribute", "closing", m, [pb.ShardChunk(header=w.header(m.peer_id, payload, w.mine),
                                                               data=payload)])
        code, reply = await sender.send(case)
        assert code == grpc.StatusCode.OK and reply.accepted, (code, reply)
        tally.accepted.add(m.peer_id)
    shard.add(c.peer_id, get_codec("fp32").decode(w.payload(c.peer_id, w.mine), w.numel(w.mine)))
    header, payload = await asyncio.wait_for(asyncio.shield(shard.result), 30)
    expected = sorted(tally.accepted | {c.peer_id})
    got = list(header.contributors)
    assert got == expected, f"round {w.round}: contributors {sorted(p[-6:] for p in set(got) - set(expected))} were " \
                            f"not accepted, {sorted(p[-6:] for p in set(expected) - set(got))} are missing"
    parts = torch.stack([get_codec("fp32").decode(w.payload(p, w.mine), w.numel(w.mine)).double() for p in expected])
    mean = get_codec("fp32").decode(payload, header.numel).double()
    assert torch.allclose(mean, parts.mean(0), atol=1e-6), f"round {w.round}: the shard is not the accepted parts' mean"
    ctx = c.rounds[w.round]
    counted = sum(steps for steps, _, _ in ctx.tally.reports.values()) if ctx.tally else 0
    bound = TARGET + (validate.UNGRANTED_STEPS + 1) * (len(peer.members) + 1)
    assert counted <= bound, f"round {w.round}: the tally counts {counted} steps (bound {bound})"


def test_every_handler_survives_structured_hostile_messages():
    bad = BadLogs()
    logging.getLogger().addHandler(bad)

    async def main() -> Tally:
        core = serving_core()
        server, port = await start_server(core, "127.0.0.1", 0)
        core.address = f"127.0.0.1:{port}"
        peer = Peer(core, core.address, [identity() for _ in range(12)], identity(), [identity() for _ in range(3)])
        sender, tally, rng = Sender(core.address), Tally(), random.Random(SEED)
        rss_after_first, started, w = 0, time.monotonic(), None
        try:
            for r in range(FIRST_ROUND, FIRST_ROUND + ROUNDS):
                serve_history(core, r)
                w = peer.begin(r, w)
                w.before = w.before and dataclasses.replace(w.before, before=None)   # one round back is enough
                tally.accepted, tally.refused = set(), set()
                await fuzz_round(peer, sender, tally, w, rng)
                await close_round(peer, sender, w, tally)
                rss_after_first = rss_after_first or psutil.Process().memory_info().rss
            health = await sender.send(Case("Health", "after", peer.members[0], pb.HealthRequest()))
            assert health[0] == grpc.StatusCode.OK and health[1].peer_id == core.peer_id, health
            grown_mb = (psutil.Process().memory_info().rss - rss_after_first) / 2**20
            print(f"\n{sum(sum(c.values()) for c in tally.counts.values())} calls in "
                  f"{time.monotonic() - started:.1f} s; resident memory grew {grown_mb:.1f} MB after round 1; "
                  f"rounds held: {sorted(core.rounds)}; tasks pending: {len(asyncio.all_tasks())}")
            assert grown_mb < RSS_GROWTH_MB, f"resident memory grew {grown_mb:.0f} MB"
            assert len(core.rounds) <= 4, sorted(core.rounds)
            assert len(asyncio.all_tasks()) < MAX_TASKS, "tasks pile up: long polls are not ended by their deadlines"
        finally:
            await sender.close()
            await server.stop(None)
            await core.channels.close()
        return tally

    try:
        tally = asyncio.run(main())
    finally:
        logging.getLogger().removeHandler(bad)
    print(tally.table())
    assert not tally.failures, f"{len(tally.failures)} calls ended wrong:\n" + "\n".join(tally.failures[:30])
    assert not bad.bad, "errors in the server's log:\n" + "\n".join(bad.bad[:30])
    total = sum(sum(c.values()) for c in tally.counts.values())
    assert total >= 10_000, total
