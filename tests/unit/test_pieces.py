"""Pieces (peer.net.shardmap.pieces): each owner's range of a large shard plan is cut into a few
shards of the roster, reduced and served one by one, so an owner's all-gather of its first pieces
overlaps the reduce-scatter of its last ones. The cut itself (pure, aligned, bounded, accepted by
members only in its one shape), the backup owner and send order it implies, and a whole butterfly
of three real cores over real gRPC servers in this process: pieces reach each owner in order, every
member ends with the exact weighted mean, bitwise equal on all of them, with int8 and fp32."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
import torch

from peer._proto import peer_pb2 as pb
from peer.codecs import get_codec
from peer.config import PeerConfig, RunSpec
from peer.net import allreduce as ar
from peer.net import member, shardmap, validate
from peer.net import owner as owner_side
from peer.net.core import NetCore
from peer.net.loop import Deadline
from peer.net.round import make_roster
from peer.net.server import start_server
from peer.net.shardmap import SHARD_ALIGN, pieces, shard_plan
from tests.fixtures import identity

pytestmark = pytest.mark.timeout(60)

BASE_NUMEL = 14_393_088   # the base preset: 57.6 MB of fp32


def fp32_bytes(numel: int) -> int:
    return 4 * numel


def test_an_owners_range_is_cut_into_aligned_pieces_of_about_the_piece_size():
    owners, bounds = shard_plan(BASE_NUMEL, ["a", "b", "c", "d"], [1e6, 1e6, 1e6, 1e6])
    cut_owners, cut = pieces(owners, bounds, fp32_bytes)
    assert cut[0] == 0 and cut[-1] == BASE_NUMEL and all(x < y for x, y in zip(cut, cut[1:], strict=False))
    assert all(x % SHARD_ALIGN == 0 for x in cut[:-1])
    for o, start, end in zip(owners, bounds, bounds[1:], strict=False):   # each owner keeps exactly its range
        mine = [j for j, p in enumerate(cut_owners) if p == o]
        assert mine == list(range(mine[0], mine[-1] + 1)), "an owner's pieces are next to each other"
        assert (cut[mine[0]], cut[mine[-1] + 1]) == (start, end)
        assert len(mine) == -(-fp32_bytes(end - start) // shardmap.PIECE_BYTES) == 7   # 14.4 MB / 2 MiB
        sizes = [cut[j + 1] - cut[j] for j in mine]
        assert max(sizes) - min(sizes) < 2 * SHARD_ALIGN   # whole units; the last owner ends ragged


def test_small_shards_stay_whole_and_large_ones_have_at_most_max_pieces():
    owners, bounds = shard_plan(40_000, ["a", "b"], [0.0, 0.0])
    assert pieces(owners, bounds, fp32_bytes) == (owners, bounds)
    owners, bounds = shard_plan(1 << 28, ["a", "b"], [1e6, 3e6])   # 1 GiB: 256 and 768 MiB
    cut_owners, _ = pieces(owners, bounds, fp32_bytes)
    assert cut_owners == ["a"] * validate.MAX_PIECES + ["b"] * validate.MAX_PIECES
    int8 = get_codec("int8")   # a quarter of the bytes: a quarter of the pieces
    assert pieces(*shard_plan(BASE_NUMEL, ["a", "b"], [0.0, 0.0]), int8.encoded_size)[0] == ["a"] * 4 + ["b"] * 4


def test_pieces_follow_the_slowest_link_so_a_fast_one_keeps_whole_shards():
    assert shardmap.piece_size([0.0, float("nan")]) == shardmap.PIECE_BYTES        # nothing measured yet
    assert shardmap.piece_size([3.1e6, 12.5e6, 0.0]) == shardmap.PIECE_BYTES       # 25 Mbit/s: 2 MiB pieces
    assert shardmap.piece_size([12.5e6, 12.5e6]) == int(12.5e6 * shardmap.PIECE_S)  # 100 Mbit/s: 3.1 MB
    members = [pb.Member(peer_id=p, address=f"127.0.0.1:{i + 1}", weight=1.0, samples=1, upload_bps=rate)
               for i, (p, rate) in enumerate(zip("abcd", [2e9, 1e9, 1.5e9, 3e9], strict=True))]
    assert len(make_roster(3, "a", members, "fp32", BASE_NUMEL).owners) == 4   # loopback: one shard an owner
    members[2].upload_bps = 3.1e6
    assert len(make_roster(3, "a", members, "fp32", BASE_NUMEL).owners) > 20


def test_a_roster_with_pieces_is_accepted_and_a_leader_that_interleaves_or_overcuts_is_refused():
    members = [pb.Member(peer_id=p, address=f"127.0.0.1:{i + 1}", weight=1.0, samples=1) for i, p in enumerate("abc")]
    r = make_roster(3, "a", members, "fp32", BASE_NUMEL)
    assert len(r.owners) > 3 and validate.roster(r, BASE_NUMEL, "fp32", "b") == ""
    bad = pb.Roster.FromString(r.SerializeToString())
    bad.owners[1], bad.owners[-1] = bad.owners[-1], bad.owners[1]
    assert "each listed once" in validate.roster(bad, BASE_NUMEL, "fp32", "b")
    numel = SHARD_ALIGN * 20
    bad = pb.Roster(round=3, leader="a", members=members, owners=["a"] * 9 + ["b"], codec="fp32", numel=numel,
                    shard_bounds=[SHARD_ALIGN * i for i in range(10)] + [numel])
    assert "more than 8 pieces" in validate.roster(bad, numel, "fp32", "b")


def test_the_backup_of_a_piece_is_the_next_other_owner_and_first_pieces_are_sent_first():
    r = pb.Roster(owners=["a", "a", "a", "b", "b", "c"])
    assert [ar.backup_owner(r, j) for j in range(6)] == ["b", "b", "b", "c", "c", "a"]
    assert [ar.piece_index(r, j) for j in range(6)] == [0, 1, 2, 0, 1, 0]
    assert ar.backup_owner(pb.Roster(owners=["a", "a"]), 1) == ""
    # b starts after itself: c, then a, then b; piece 0 of each before any piece 1
    assert member.send_order(r, "b") == [5, 0, 3, 1, 4, 2]
    assert member.send_order(r, "z") == [0, 3, 5, 1, 4, 2]   # a client-mode member starts at the first owner


@contextlib.asynccontextmanager
async def swarm_of(codec: str, n: int = 3):
    """n real cores, each with its real gRPC server on loopback, at round 1 of one run; and their Members."""
    spec = RunSpec(model="tiny", codec=codec)
    cores, servers, members = [], [], []
    try:
        for i in range(n):
            core = NetCore(None, PeerConfig(run_id="pieces", timeout_floor_s=2.0), identity())  # type: ignore[arg-type]
            core.spec, core.spec_hash, core.round = spec, spec.hash(), 1
            cores.append(core)
            server, port = await start_server(core, "127.0.0.1", 0)
            servers.append(server)
            members.append(pb.Member(peer_id=core.peer_id, address=f"127.0.0.1:{port}", weight=float(i + 1),
                                     samples=4 * (i + 1)))
        yield cores, servers, members
    finally:
        for server in servers:
            await server.stop(None)
        for core in cores:
            await core.channels.close()


@pytest.mark.parametrize("codec", ["fp32", "int8"])
def test_a_butterfly_with_pieces_over_real_grpc_gives_every_member_the_same_exact_mean(codec, monkeypatch):
    # one unit a piece: a test-sized state cut like a large one
    monkeypatch.setattr(shardmap, "PIECE_BYTES", get_codec(codec).encoded_size(SHARD_ALIGN))
    numel = 3 * 4 * SHARD_ALIGN + 1000                      # 3 owners with 4 pieces each, a ragged end

    async def body():
        async with swarm_of(codec) as (cores, _, members):
            roster = make_roster(1, cores[0].peer_id, members, codec, numel)
            assert len(roster.owners) == 12 and len(set(roster.owners)) == 3
            arrivals: dict[str, list[int]] = {}   # owner's log: "sender" -> shards in the order they came
            add = ar.OwnedShard.add

            def logged(shard, sender, values, sha=""):
                arrivals.setdefault(f"{roster.owners[shard.index]}<-{sender}", []).append(shard.index)
                add(shard, sender, values, sha)

            monkeypatch.setattr(ar.OwnedShard, "add", logged)
            deltas = [torch.randn(numel, generator=torch.Generator().manual_seed(i)) for i in range(3)]
            avgs = [torch.empty(numel) for _ in cores]
            for core in cores:
                core.ctx(1).roster.set_result(roster)
                owner_side.own_shards(core, core.ctx(1), roster)
            done = await asyncio.gather(*[
                member.send_and_fetch(core, core.ctx(1), roster, delta, Deadline(40), avg)
                for core, delta, avg in zip(cores, deltas, avgs, strict=True)])
            for _, results in done:
                assert all(isinstance(res, ar.ShardResult) for res in results), results
                assert [res.header.contributors for res in results] == [[m.peer_id for m in roster.members]] * 12
            for order in arrivals.values():   # each member's pieces reach an owner one after another
                assert order == sorted(order) and len(order) == 4, arrivals
            assert len(arrivals) == 9
            weights = {m.peer_id: m.weight for m in roster.members}
            exact = sum(weights[c.peer_id] * d.double() for c, d in zip(cores, deltas, strict=True)) / sum(weights.values())
            bound = 1e-6 if codec == "fp32" else 0.05 * float(exact.abs().max())   # int8: twice a blockwise scale
            assert float((avgs[0].double() - exact).abs().max()) <= bound
            assert all(torch.equal(avgs[0], a) for a in avgs[1:])

    asyncio.run(body())


def test_a_dead_owners_pieces_are_reduced_again_by_the_next_other_owner(monkeypatch):
    """An owner that is gone when the round starts: every one of its pieces is reduced again by its
    backup (the next other owner), without it; the others' pieces after the transfer timeout."""
    monkeypatch.setattr(shardmap, "PIECE_BYTES", get_codec("fp32").encoded_size(SHARD_ALIGN))
    numel = 3 * 3 * SHARD_ALIGN

    async def body():
        async with swarm_of("fp32") as (cores, servers, members):
            roster = make_roster(1, cores[0].peer_id, members, "fp32", numel)
            dead = roster.owners[0]
            alive = [c for c in cores if c.peer_id != dead]
            await servers[[c.peer_id for c in cores].index(dead)].stop(None)
            deltas = {c.peer_id: torch.randn(numel, generator=torch.Generator().manual_seed(i))
                      for i, c in enumerate(cores)}
            avgs = {c.peer_id: torch.empty(numel) for c in alive}
            for core in alive:
                core.ctx(1).roster.set_result(roster)
                owner_side.own_shards(core, core.ctx(1), roster)
            done = await asyncio.gather(*[
                member.send_and_fetch(c, c.ctx(1), roster, deltas[c.peer_id], Deadline(40), avgs[c.peer_id])
                for c in alive])
            backup = ar.backup_owner(roster, 0)
            for _, results in done:
                assert all(isinstance(res, ar.ShardResult) for res in results), results
                for j, res in enumerate(results):
                    assert sorted(res.header.contributors) == sorted(c.peer_id for c in alive)
                    assert res.header.backup == (roster.owners[j] == dead)
            assert roster.owners[:3] == [dead] * 3 and backup not in ("", dead)
            weights = {m.peer_id: m.weight for m in roster.members}
            exact = sum(weights[c.peer_id] * deltas[c.peer_id].double() for c in alive) / sum(
                weights[c.peer_id] for c in alive)
            a, b = avgs.values()
            assert torch.equal(a, b) and float((a.double() - exact).abs().max()) <= 1e-6
            assert all(dead in c.ctx(1).unreachable for c in alive)

    asyncio.run(body())
