"""Error feedback across churn: one flat residual per peer, sliced by each round's shard bounds, for a
member's sends and an owner's re-encoding; checkpoints hold one model-sized residual each. Rounds run
in-process through the real encode, reduction and commit code (no sockets), int8 codec."""

from __future__ import annotations

import asyncio
import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from peer._proto import peer_pb2 as pb
from peer.aggregate import weighted_mean
from peer.checkpoint import Checkpoint, CheckpointError, latest, load, save, save_round
from peer.codecs import Int8Codec
from peer.feedback import ErrorFeedback
from peer.net import allreduce as ar
from peer.net.round import make_roster
from peer.outer import GlobalState

pytestmark = pytest.mark.timeout(60)

NUMEL = 49_152  # 12 units of round.SHARD_ALIGN: 3 owners: [0, 16384, 32768, 49152); 4 owners: [0, 12288, 24576, 36864, 49152)
CODEC = Int8Codec()
THREE, FOUR = ["a", "p", "z"], ["a", "p", "q", "z"]  # "p" owns shard 1: [16384, 32768), then [12288, 24576)


@dataclass
class Peer:
    ef: ErrorFeedback = field(default_factory=ErrorFeedback)
    owner_ef: ErrorFeedback = field(default_factory=ErrorFeedback)


@dataclass
class Round:
    roster: pb.Roster
    sent: dict[str, list[bytes]]  # each member's payloads, in shard order
    reduced: list[ar.OwnedShard]

    def contributed(self, peer: str, j: int) -> bool:
        return peer in self.reduced[j].result.result()[0].contributors


def delta_of(peer: str, r: int) -> torch.Tensor:
    seed = 1000 * r + sum(map(ord, peer))
    return torch.randn(NUMEL, generator=torch.Generator().manual_seed(seed))


def run_round(r: int, peers: dict[str, Peer], ids: list[str], missing: frozenset = frozenset()) -> Round:
    """One applied round among ids; a (peer, shard) in missing never reaches the shard's owner.
    Commits as member.run_round does: a member's slices where the header lists it, every owner's."""
    members = [pb.Member(peer_id=p, address=f"127.0.0.1:{i + 1}", weight=1.0, samples=1) for i, p in enumerate(ids)]
    roster = make_roster(r, ids[0], members, CODEC.name, NUMEL)
    encoded = {p: ar.encode_shards(delta_of(p, r), roster, CODEC, peers[p].ef) for p in ids}
    reduced = asyncio.run(reduce_all(roster, peers, encoded, missing))
    done = Round(roster, {p: [payload for payload, _ in encoded[p]] for p in ids}, reduced)
    for p in ids:
        mine = [encoded[p][j][1] for j in range(len(reduced)) if done.contributed(p, j)]
        ar.apply_residuals(peers[p].ef, CODEC, mine)
    for j, shard in enumerate(reduced):
        ar.apply_residuals(peers[roster.owners[j]].owner_ef, CODEC, [shard.pending_residual])
    return done


async def reduce_all(roster: pb.Roster, peers: dict[str, Peer], encoded: dict, missing: frozenset
                     ) -> list[ar.OwnedShard]:
    out = []
    for j, owner in enumerate(roster.owners):
        shard = ar.OwnedShard(roster, j, CODEC)
        numel = roster.shard_bounds[j + 1] - roster.shard_bounds[j]
        for p, sends in encoded.items():
            if (p, j) not in missing:
                shard.add(p, CODEC.decode(sends[j][0], numel))
        await shard.reduce_at(0.0, peers[owner].owner_ef)
        out.append(shard)
    return out


def slices(roster: pb.Roster) -> list[slice]:
    b = roster.shard_bounds
    return [slice(b[j], b[j + 1]) for j in range(len(roster.owners))]


def member_reference(ref: torch.Tensor, done: Round, peer: str) -> torch.Tensor:
    """The flat rule, recomputed: shard j sends delta[j] + ref[j]; a contributed slice becomes what
    its encode lost. Checks the bytes sent; returns the new residual."""
    ref = ref.clone()
    for j, s in enumerate(slices(done.roster)):
        target = torch.add(delta_of(peer, done.roster.round)[s], ref[s])
        assert done.sent[peer][j] == CODEC.encode(target), f"round {done.roster.round} shard {j}"
        if done.contributed(peer, j):
            ref[s] = torch.sub(target, CODEC.decode(CODEC.encode(target), target.numel()))
    return ref


def test_member_residual_is_one_flat_tensor_across_group_sizes_3_4_3() -> None:
    peers = {p: Peer() for p in FOUR}
    ref = torch.zeros(NUMEL)
    sent_sum, decoded_sum = torch.zeros(NUMEL, dtype=torch.float64), torch.zeros(NUMEL, dtype=torch.float64)
    for r, ids in enumerate([THREE, FOUR, THREE]):
        done = run_round(r, peers, ids)
        ref = member_reference(ref, done, "p")
        residual = peers["p"].ef.residual()
        assert residual is not None and residual.shape == (NUMEL,)
        assert torch.equal(residual, ref), f"round {r}"
        assert list(peers["p"].ef.state_dict()) == ["residual"]
        sent_sum += delta_of("p", r).double()
        decoded_sum += torch.cat([CODEC.decode(b, s.stop - s.start)
                                  for b, s in zip(done.sent["p"], slices(done.roster), strict=True)]).double()
        # all that was sent arrived, but for the one residual: nothing of an earlier group size is
        # orphaned or added back twice (keyed residuals broke this at the second 3-member round)
        torch.testing.assert_close(sent_sum - decoded_sum, residual.double(), rtol=0, atol=1e-5)
    assert float(residual.abs().max()) < 0.05  # one encode's worth, not several rounds'


def test_a_shard_without_our_contribution_keeps_its_slice() -> None:
    peers = {p: Peer() for p in THREE}
    run_round(0, peers, THREE)
    before = peers["p"].ef.residual()
    done = run_round(1, peers, THREE, missing=frozenset({("p", 0)}))
    assert not done.contributed("p", 0) and done.contributed("p", 1) and done.contributed("p", 2)
    after = peers["p"].ef.residual()
    assert torch.equal(member_reference(before, done, "p"), after)
    kept, changed = slices(done.roster)[0], slice(16384, NUMEL)
    assert torch.equal(after[kept], before[kept])
    assert not torch.equal(after[changed], before[changed])


def owner_target(done: Round, j: int, residual: torch.Tensor) -> torch.Tensor:
    """What shard j's owner should have encoded: the members' mean plus the given residual slice."""
    s, ids = slices(done.roster)[j], list(done.sent)
    mean = weighted_mean([(1.0, CODEC.decode(done.sent[p][j], s.stop - s.start)) for p in ids])
    return torch.add(mean, residual[s])


def test_owner_residual_keeps_the_overlap_with_its_old_range_and_zeroes_the_rest() -> None:
    peers = {p: Peer() for p in FOUR}
    run_round(0, peers, THREE)  # p owns [16384, 32768)
    first = peers["p"].owner_ef.residual()
    assert first is not None and first.shape == (NUMEL,)
    assert not bool(first[16384:32768].eq(0).all()) and bool(first[:16384].eq(0).all() and first[32768:].eq(0).all())

    done = run_round(1, peers, FOUR)  # p owns [12288, 24576): compensated with [16384, 24576) of the old one only
    expected = torch.zeros(NUMEL)
    expected[16384:24576] = first[16384:24576]
    target = owner_target(done, 1, expected)
    header, payload = done.reduced[1].result.result()
    assert payload == CODEC.encode(target)
    second = peers["p"].owner_ef.residual()
    lost = torch.sub(target, CODEC.decode(payload, target.numel()))
    assert torch.equal(second[12288:24576], lost)
    assert bool(second[:12288].eq(0).all() and second[24576:].eq(0).all())  # [24576, 32768) of round 0: dropped

    done = run_round(2, peers, THREE)  # p owns [16384, 32768) again: keeps [16384, 24576), not round 0's [24576, 32768)
    expected = torch.zeros(NUMEL)
    expected[16384:24576] = second[16384:24576]
    assert done.reduced[1].result.result()[1] == CODEC.encode(owner_target(done, 1, expected))


def test_checkpoint_holds_one_model_sized_residual_however_many_group_sizes(tmp_path: Path) -> None:
    peers = {p: Peer() for p in FOUR}
    for r, ids in enumerate([THREE, FOUR, THREE, FOUR]):
        run_round(r, peers, ids)
    p = peers["p"]
    state = GlobalState(torch.zeros(NUMEL), torch.zeros(NUMEL), 4, 0)
    ckpt = Checkpoint(state=state, run_id="run", spec_hash="spec", peer_id="p", optimizer={}, data={},
                      residuals=p.ef.state_dict(), owner_residuals=p.owner_ef.state_dict())
    save_round(tmp_path, ckpt)
    loaded = latest(tmp_path, "run", "spec")
    assert loaded is not None
    for held, live in ((loaded.residuals, p.ef), (loaded.owner_residuals, p.owner_ef)):
        assert list(held) == ["residual"] and held["residual"].shape == (NUMEL,)
        assert torch.equal(held["residual"], live.residual())

    restored = copy.deepcopy(peers)  # the others go on as they were; p restarts from its checkpoint
    restored["p"] = Peer()
    restored["p"].ef.load_state_dict(loaded.residuals, numel=NUMEL)
    restored["p"].owner_ef.load_state_dict(loaded.owner_residuals, numel=NUMEL)
    ours, theirs = run_round(4, restored, THREE), run_round(4, peers, THREE)
    assert ours.sent == theirs.sent
    assert [s.result.result() for s in ours.reduced] == [s.result.result() for s in theirs.reduced]
    assert torch.equal(restored["p"].ef.residual(), p.ef.residual())
    assert torch.equal(restored["p"].owner_ef.residual(), p.owner_ef.residual())


def keyed_ckpt(residuals: dict, owner_residuals: dict) -> Checkpoint:
    state = GlobalState(torch.zeros(NUMEL), torch.zeros(NUMEL), 3, 0)
    return Checkpoint(state=state, run_id="run", spec_hash="spec", peer_id="p", optimizer={}, data={},
                      residuals=residuals, owner_residuals=owner_residuals)


def test_keyed_residuals_of_an_older_checkpoint_are_added_into_one(tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    gen = torch.Generator().manual_seed(5)
    keyed = {(0, 16384): torch.randn(16384, generator=gen), (16384, 32768): torch.randn(16384, generator=gen),
             (32768, NUMEL): torch.randn(16384, generator=gen), (12288, 24576): torch.randn(12288, generator=gen)}
    owner_keyed = {("owner", 16384, 32768): torch.randn(16384, generator=gen),
                   ("owner", 12288, 24576): torch.randn(12288, generator=gen)}
    save(tmp_path / "old.ckpt", keyed_ckpt(keyed, owner_keyed))
    with caplog.at_level(logging.WARNING, logger="peer.checkpoint"):
        loaded = load(tmp_path / "old.ckpt")
    assert "residuals held 4 keyed residuals" in caplog.text and "owner_residuals held 2" in caplog.text
    for held, old in ((loaded.residuals, keyed), (loaded.owner_residuals, owner_keyed)):
        expected = torch.zeros(NUMEL, dtype=torch.float64)
        for key, r in old.items():
            expected[key[-2]:key[-1]] += r.double()
        assert list(held) == ["residual"] and held["residual"].dtype == torch.float32
        torch.testing.assert_close(held["residual"].double(), expected, rtol=0, atol=1e-6)
    ErrorFeedback().load_state_dict(loaded.residuals, numel=NUMEL)


@pytest.mark.parametrize("residuals, match", [
    ({"residual": torch.zeros(NUMEL - 1)}, r"residuals \(residual: 49151 values, expected 49152"),
    ({"residual": torch.zeros(NUMEL, dtype=torch.float64)}, r"residuals \(residual: expected a 1-D float32"),
    ({(0, NUMEL + 1): torch.zeros(NUMEL + 1)}, r"range \(0, 49153\) is outside the model's 49152 values"),
    ({(0, 10): torch.zeros(9)}, "residual: 9 values, expected 10"),
    ({"residual": torch.zeros(NUMEL), "other": torch.zeros(1)}, r"residuals \(keys"),
])
def test_a_residual_that_does_not_fit_the_model_is_refused(tmp_path: Path, residuals: dict, match: str) -> None:
    save(tmp_path / "bad.ckpt", keyed_ckpt(residuals, {}))
    with pytest.raises(CheckpointError, match=match):
        load(tmp_path / "bad.ckpt")
