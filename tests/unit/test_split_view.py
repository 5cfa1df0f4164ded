"""Two peers that averaged together in round r-1, where one's DHT view has lost the other's record
(a store or a read that timed out under load): the one that lost it must not lead a group of its
own while the other leads one too, which gives round r two states (seen in a CI run: peers a and b
each applied round 13 alone, and with two signers the digest check can never heal that). It sends
its Join to the best candidate of its last group instead. Real cores with their gRPC servers."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from hivemind.utils import get_dht_time

from peer._proto import peer_pb2 as pb
from peer.config import PeerConfig, RunSpec
from peer.net import group, swarm
from peer.net.core import NetCore
from peer.net.loop import Deadline
from peer.net.round import leader_rank
from peer.net.server import start_server
from tests.fixtures import identity

pytestmark = pytest.mark.timeout(60)
RUN, R = "split", 5


def record(c: NetCore) -> swarm.PeerRecord:
    return swarm.PeerRecord(c.peer_id, c.address, c.round, 8, 32, 10.0, True, False, c.round, c.spec_hash,
                            get_dht_time(), swarm.TRAIN)


def joiner(c: NetCore) -> pb.Member:
    return pb.Member(peer_id=c.peer_id, address=c.address, weight=8.0, samples=32)


@contextlib.asynccontextmanager
async def pair():
    """Two cores at round R that were one group in round R-1, best-ranked leader of R first."""
    spec = RunSpec(model="tiny", codec="fp32")
    cores, servers = [], []
    try:
        for _ in range(2):
            c = NetCore(None, PeerConfig(run_id=RUN, join_window_s=1.0), identity())  # type: ignore[arg-type]
            c.spec, c.spec_hash, c.round, c.numel = spec, spec.hash(), R, 40_000
            server, port = await start_server(c, "127.0.0.1", 0)
            c.address = f"127.0.0.1:{port}"
            cores.append(c)
            servers.append(server)
        for c in cores:
            c.last_group = (R - 1, {x.peer_id: x.address for x in cores})
        yield sorted(cores, key=lambda c: leader_rank(RUN, R, c.peer_id))
    finally:
        for s in servers:
            await s.stop(None)
        for c in cores:
            await c.channels.close()


def test_a_peer_blind_to_its_last_group_joins_its_leader_instead_of_leading_alone():
    async def body():
        async with pair() as (best, other):
            best.view, other.view = {other.peer_id: record(other)}, {}   # other's DHT lost best's record
            both = await asyncio.gather(group.join_round(best, R, joiner(best), Deadline(20)),
                                        group.join_round(other, R, joiner(other), Deadline(20)))
            assert both[0] is not None and both[1] is not None
            assert both[0].hash == both[1].hash, "two rosters for one round"
            assert {m.peer_id for m in both[0].members} == {best.peer_id, other.peer_id}

    asyncio.run(body())


def test_joining_after_the_leader_closed_without_us_leaves_us_out_of_the_round_not_alone_in_it():
    async def body():
        async with pair() as (best, other):
            best.view, other.view = {other.peer_id: record(other)}, {}
            first = await group.join_round(best, R, joiner(best), Deadline(20))   # closes without other
            assert [m.peer_id for m in first.members] == [best.peer_id]
            late = await group.join_round(other, R, joiner(other), Deadline(20))
            assert late is None, f"a second group of round {R}: {[m.peer_id[-6:] for m in late.members]}"

    asyncio.run(body())


def test_a_best_candidate_that_is_gone_costs_a_probe_and_we_lead():
    async def body():
        async with pair() as (best, other):
            other.view = {}
            other.last_group = (R - 1, {best.peer_id: "127.0.0.1:1", other.peer_id: other.address})   # refuses
            roster = await group.join_round(other, R, joiner(other), Deadline(20))
            assert [m.peer_id for m in roster.members] == [other.peer_id]
            assert best.peer_id in other.gone, "the refusing candidate is skipped from now on"
            other.last_group = (R - 2, other.last_group[1])
            assert [p for p, _ in other.candidates(R, set())] == [other.peer_id], "only the group of R-1 counts"

    asyncio.run(body())
