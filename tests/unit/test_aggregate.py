"""weighted_mean: close to a float64 reference, strict on inputs, same bytes for same inputs."""

from __future__ import annotations

import pytest
import torch

from peer.aggregate import total_weight, weighted_mean

pytestmark = pytest.mark.timeout(60)


def contributions(num_peers: int = 5, numel: int = 10_001, seed: int = 0) -> list[tuple[float, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    weights = [float(w) for w in torch.randint(1, 500, (num_peers,), generator=gen)]
    return [(w, torch.randn(numel, generator=gen)) for w in weights]


def test_matches_float64_reference() -> None:
    contribs = contributions()
    reference = sum(w * x.double() for w, x in contribs) / sum(w for w, _ in contribs)
    result = weighted_mean(contribs)
    assert result.dtype == torch.float32 and result.shape == (10_001,)
    scale = max(float(x.abs().max()) for _, x in contribs)
    assert float((result.double() - reference).abs().max()) <= 1e-6 * scale


def test_fractional_weights_and_single_contribution() -> None:
    x = torch.randn(100, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(weighted_mean([(0.3, x)]), x, rtol=1e-6, atol=0)
    y = torch.randn(100, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(
        weighted_mean([(0.25, x), (0.75, y)]), 0.25 * x + 0.75 * y, rtol=1e-6, atol=1e-7
    )


def test_same_inputs_same_bytes_and_inputs_untouched() -> None:
    contribs = contributions()
    copies = [(w, x.clone()) for w, x in contribs]
    first = weighted_mean(contribs).numpy().tobytes()
    assert weighted_mean(copies).numpy().tobytes() == first
    assert all(torch.equal(x, c) for (_, x), (_, c) in zip(contribs, copies, strict=True))


def test_order_is_the_callers() -> None:
    """Summation follows the given order; the caller sorts by member, so this only documents it."""
    contribs = contributions(num_peers=8)
    forward = weighted_mean(contribs)
    backward = weighted_mean(contribs[::-1])
    torch.testing.assert_close(forward, backward, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), 1e-50, 1e39, True, "2"])
def test_rejects_bad_weights(bad: object) -> None:
    with pytest.raises(ValueError, match="weight"):
        weighted_mean([(1.0, torch.ones(3)), (bad, torch.ones(3))])  # type: ignore[list-item]


def test_rejects_empty_and_mismatched() -> None:
    with pytest.raises(ValueError, match="at least one"):
        weighted_mean([])
    with pytest.raises(ValueError, match="contribution 1: .* shape"):
        weighted_mean([(1.0, torch.ones(3)), (1.0, torch.ones(4))])
    with pytest.raises(ValueError, match="contribution 0"):
        weighted_mean([(1.0, torch.ones(3, dtype=torch.float64))])


def test_total_weight_is_float32_sum_in_order() -> None:
    assert total_weight([1.0, 2.0, 3.5]) == 6.5
    assert total_weight([0.1]) == float(torch.tensor(0.1, dtype=torch.float32))
    assert total_weight([2.0**24, 1.0]) == 2.0**24  # float32 rounding, not float64
    with pytest.raises(ValueError, match="total weight"):
        total_weight([3e38, 3e38])
