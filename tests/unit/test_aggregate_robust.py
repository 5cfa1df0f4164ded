"""Trimmed mean and centered clipping: they ignore an outlier the mean follows, respect weights,
reduce to the mean where they should, and give the same bytes on every call and thread count."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
import torch

from peer._proto import peer_pb2 as pb
from peer.aggregate import aggregator, centered_clip, weighted_mean, weighted_median, weighted_trimmed_mean
from peer.codecs import Fp32Codec
from peer.config import RunSpec
from peer.feedback import ErrorFeedback
from peer.net import allreduce as ar
from peer.net.owner import aggregator_of
from peer.net.round import make_roster
from peer.net.shardmap import SHARD_ALIGN

pytestmark = pytest.mark.timeout(120)

ROBUST = {"trimmed-mean": lambda c: weighted_trimmed_mean(c, 0.2), "centered-clip": lambda c: centered_clip(c)}


def honest(num_peers: int = 4, numel: int = 20_001, seed: int = 0) -> list[tuple[float, torch.Tensor]]:
    """Deltas near one shared direction, as peers training from the same state give."""
    gen = torch.Generator().manual_seed(seed)
    common = torch.randn(numel, generator=gen)
    return [(1.0, common + 0.3 * torch.randn(numel, generator=gen)) for _ in range(num_peers)]


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x - ref).norm() / ref.norm())


@pytest.mark.parametrize("name", ROBUST)
@pytest.mark.parametrize("factor", [1000.0, -1.0])
def test_one_liar_among_five_is_outvoted(name: str, factor: float) -> None:
    good = honest()
    ref = weighted_mean(good)
    liar = (1.0, factor * good[0][1])
    contribs = good[:2] + [liar] + good[2:]   # the liar sits in the middle of the member order
    assert rel_err(weighted_mean(contribs), ref) > 0.3     # the mean follows it
    assert rel_err(ROBUST[name](contribs), ref) < 0.15


@pytest.mark.parametrize("name", ROBUST)
def test_same_bytes_across_calls_and_thread_counts(name: str) -> None:
    contribs = honest(num_peers=5, numel=300_001) + [(2.5, 50 * torch.ones(300_001))]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ROBUST[name](contribs).numpy().tobytes()
        torch.set_num_threads(4)
        assert ROBUST[name]([(w, x.clone()) for w, x in contribs]).numpy().tobytes() == one
        assert ROBUST[name](contribs).numpy().tobytes() == one
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("name", ROBUST)
def test_equal_inputs_give_that_input(name: str) -> None:
    x = torch.randn(5000, generator=torch.Generator().manual_seed(1))
    contribs = [(w, x.clone()) for w in (1.0, 3.0, 0.5, 2.0, 7.0)]
    torch.testing.assert_close(ROBUST[name](contribs), x, rtol=1e-6, atol=0)
    torch.testing.assert_close(ROBUST[name](contribs), weighted_mean(contribs), rtol=1e-6, atol=0)


def test_trimmed_mean_drops_exactly_the_extremes_by_weight() -> None:
    vals = [5.0, -3.0, 1.0, 100.0, 2.0]
    contribs = [(1.0, torch.tensor([v, -v])) for v in vals]
    # 0.2 of 5 equal weights: the lowest and the highest value of each coordinate go
    torch.testing.assert_close(weighted_trimmed_mean(contribs, 0.2), torch.tensor([8 / 3, -8 / 3]))
    # 0.1: half of the lowest and half of the highest weight go
    expected = (0.5 * -3 + 1 + 2 + 5 + 0.5 * 100) / 4
    torch.testing.assert_close(weighted_trimmed_mean(contribs, 0.1), torch.tensor([expected, -expected]))
    # a weight of 3 on the 100 keeps it in: 1.4 of the 7 units go at each end, so all of the -3
    # and 0.4 of the 1 go at the bottom, 1.4 of the 100's 3 units at the top: weights are respected
    heavy = [(3.0 if v == 100.0 else 1.0, torch.tensor([v])) for v in vals]
    torch.testing.assert_close(weighted_trimmed_mean(heavy, 0.2),
                               torch.tensor([(0.6 * 1 + 2 + 5 + 1.6 * 100) / 4.2]))


def test_weighted_median_and_clip_respect_weights() -> None:
    vals = torch.tensor([[0.0], [1.0], [2.0], [3.0], [4.0]])
    assert float(weighted_median([(1.0, v) for v in vals])) == 2.0
    assert float(weighted_median([(w, v) for w, v in zip([1, 1, 1, 1, 10.0], vals, strict=True)])) == 4.0
    # a heavy honest majority pulls centered clipping to its value; the light ones move it only a little
    contribs = [(10.0, torch.full((100,), 1.0))] + [(1.0, torch.full((100,), v)) for v in (5.0, 6.0, 7.0)]
    assert abs(float(centered_clip(contribs).mean()) - 1.0) < 0.6


@pytest.mark.parametrize("name", ROBUST)
def test_one_or_two_contributions_are_the_mean(name: str) -> None:
    x, y = torch.randn(100), torch.randn(100)
    for contribs in ([(2.0, x)], [(2.0, x), (0.5, y)]):
        assert torch.equal(ROBUST[name](contribs), weighted_mean(contribs))


def test_aggregator_names_and_bad_parameters() -> None:
    assert aggregator("mean") is weighted_mean
    with pytest.raises(ValueError, match="unknown aggregator 'median'"):
        aggregator("median")
    with pytest.raises(ValueError, match="trim_fraction must be in"):
        weighted_trimmed_mean([(1.0, torch.ones(3))] * 3, 0.5)
    with pytest.raises(ValueError, match="clip_tau > 0"):
        centered_clip([(1.0, torch.ones(3))] * 3, clip_tau=0.0)
    with pytest.raises(ValueError, match="contribution 1: .* shape"):
        weighted_trimmed_mean([(1.0, torch.ones(3)), (1.0, torch.ones(4)), (1.0, torch.ones(3))], 0.2)


@pytest.mark.parametrize("name", ["mean", "trimmed-mean", "centered-clip"])
def test_an_owner_reduces_with_the_runs_aggregator(name: str) -> None:
    """The real OwnedShard of a run whose spec names `name` serves that aggregate's bytes (fp32)."""
    numel = 4 * SHARD_ALIGN
    ids = ["a", "b", "c", "d", "e"]
    members = [pb.Member(peer_id=p, address=f"127.0.0.1:{i + 1}", weight=1.0, samples=1) for i, p in enumerate(ids)]
    roster = make_roster(0, "a", members, "fp32", numel)
    contribs = honest(num_peers=5, numel=numel)
    contribs[3] = (1.0, -100 * contribs[3][1])
    spec = RunSpec(aggregator=name, codec="fp32")
    reduce = aggregator_of(SimpleNamespace(spec=spec))  # type: ignore[arg-type]  # the spec is all it reads

    async def reduce_shard(j: int) -> bytes:
        shard = ar.OwnedShard(roster, j, Fp32Codec(), aggregate=reduce)
        a, b = roster.shard_bounds[j], roster.shard_bounds[j + 1]
        for p, (_, x) in zip(ids, contribs, strict=True):
            shard.add(p, x[a:b].clone())
        await shard.reduce_at(5.0, ErrorFeedback())
        return shard.result.result()[1]

    served = b"".join(asyncio.run(reduce_shard(j)) for j in range(len(roster.owners)))
    expected = aggregator(name, spec.trim_fraction, spec.clip_tau, spec.clip_iters)
    bounds = roster.shard_bounds
    assert served == b"".join(Fp32Codec().encode(expected([(w, x[bounds[j]:bounds[j + 1]]) for w, x in contribs]))
                              for j in range(len(roster.owners)))
