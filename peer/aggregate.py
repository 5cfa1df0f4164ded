"""Weighted means over float32 shards, reduced in the caller's (sorted member) order: the plain
mean and two robust ones (trimmed mean, centered clipping) for runs with peers that may lie.

Pure CPU torch with single-rounding float32 elementwise ops in a fixed order (the one reduction,
a norm, is numpy's single-threaded pairwise sum in float64), so every machine and every thread
count gets the same bytes; no net code.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch

from peer.hostmem import empty_f32


def _weight_f32(weight: float) -> float:
    """weight rounded to float32 (as a python float); ValueError unless finite and > 0 after rounding."""
    if isinstance(weight, bool) or not isinstance(weight, numbers.Real):
        raise ValueError(f"weight must be a real number, got {weight!r}")
    if not math.isfinite(weight) or weight <= 0:
        raise ValueError(f"weight must be a finite number > 0, got {weight!r}")
    with np.errstate(over="ignore"):
        weight_f32 = np.float32(weight)
    if not (np.isfinite(weight_f32) and weight_f32 > 0):
        raise ValueError(f"weight {weight!r} is not a finite positive float32")
    return float(weight_f32)


def total_weight(weights: Iterable[float]) -> float:
    """The float32 sum of weights, added in the given order; ValueError on a bad weight or overflow."""
    total = np.float32(0.0)
    with np.errstate(over="ignore"):
        for weight in weights:
            total = np.float32(total + np.float32(_weight_f32(weight)))
    if not np.isfinite(total) or total <= 0:
        raise ValueError(f"total weight {float(total)!r} is not a finite positive float32")
    return float(total)


def _checked(contributions: Sequence[tuple[float, torch.Tensor]], what: str) -> list[float]:
    """The float32 weights; ValueError unless there is a contribution and all are float32 CPU
    tensors of one shape with good weights."""
    if not contributions:
        raise ValueError(f"{what} needs at least one contribution")
    shape = contributions[0][1].shape
    for index, (_, x) in enumerate(contributions):
        if x.dtype != torch.float32 or x.device.type != "cpu" or x.shape != shape:
            raise ValueError(
                f"contribution {index}: expected float32 CPU tensor of shape {tuple(shape)}, "
                f"got {x.dtype} on {x.device} of shape {tuple(x.shape)}"
            )
    return [_weight_f32(weight) for weight, _ in contributions]


def weighted_mean(contributions: Sequence[tuple[float, torch.Tensor]]) -> torch.Tensor:
    """sum_i(w_i * x_i) / sum_i(w_i) as a new float32 tensor, summed in the given order.

    Each product, each add and the final divide is one float32 rounding. Inputs are never mutated.
    """
    weights_f32 = _checked(contributions, "weighted_mean")
    acc = torch.mul(contributions[0][1], weights_f32[0], out=empty_f32(contributions[0][1].numel()))
    term = empty_f32(acc.numel()) if len(contributions) > 1 else acc
    for weight_f32, (_, x) in zip(weights_f32[1:], contributions[1:], strict=True):
        acc.add_(torch.mul(x, weight_f32, out=term))   # the same ops in the same order, into two buffers
    return acc.div_(total_weight(weights_f32))


MIN_ROBUST = 3            # with fewer contributions there is no majority to outvote one: the mean
SORT_VALUES = 1 << 18     # values (contributions x coordinates) sorted at a time: bounds the temporaries
NORM_CHUNK = 1 << 18      # values per float64 partial sum of a squared norm


def _sorted_columns(contributions: Sequence[tuple[float, torch.Tensor]], weights_f32: list[float]
                    ) -> Iterable[tuple[int, int, torch.Tensor, torch.Tensor]]:
    """(a, b, values, mass) for the coordinates [a, b) in blocks: values (n, b - a) sorted
    ascending per coordinate (stable: ties keep member order, so the permutation is unique) and
    mass the matching float32 weights."""
    n, numel = len(contributions), contributions[0][1].numel()
    weights = torch.tensor(weights_f32, dtype=torch.float32)
    step = max(1024, SORT_VALUES // n)
    for a in range(0, numel, step):
        b = min(numel, a + step)
        # sorted along the last dim of (coordinates, n), about twice as fast as along the first of (n, coordinates)
        values, order = torch.sort(torch.stack([x.reshape(-1)[a:b] for _, x in contributions], dim=1), stable=True)
        yield a, b, values.t().contiguous(), weights[order.t()]


def weighted_trimmed_mean(contributions: Sequence[tuple[float, torch.Tensor]], trim_fraction: float
                          ) -> torch.Tensor:
    """Per coordinate, each contribution's value carries its weight as mass; the lowest and the
    highest `trim_fraction` of the total weight W are dropped and the mean of the mass left is
    returned. Precisely, with the values sorted ascending (v_k, mass m_k, C_k = m_0 + ... + m_k,
    C_-1 = 0), lo = trim_fraction * W and hi = W - lo: kept_k = max(0, min(C_k, hi) - max(C_k-1, lo))
    and the result is sum_k kept_k v_k / sum_k kept_k, summed in sorted order, all in float32. A
    contribution straddling a cut counts with the part of its weight inside. With equal weights and
    trim_fraction = j/n it drops exactly j values at each end (0.2 of 5: the lowest and the highest).

    Fewer than 3 contributions (no majority to outvote one) or trim_fraction 0: `weighted_mean`.
    Claimed weights are trusted: one contribution holding more than trim_fraction of W is never
    wholly dropped (pair it with --weighting equal where weights cannot be checked)."""
    weights_f32 = _checked(contributions, "weighted_trimmed_mean")
    if not 0 <= trim_fraction < 0.5:
        raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction!r}")
    if len(contributions) < MIN_ROBUST or trim_fraction == 0:
        return weighted_mean(contributions)
    total = total_weight(weights_f32)
    lo = float(np.float32(trim_fraction * total))
    hi = float(np.float32(np.float32(total) - np.float32(lo)))
    out = torch.empty(contributions[0][1].numel(), dtype=torch.float32)
    for a, b, values, mass in _sorted_columns(contributions, weights_f32):
        below = torch.zeros(b - a, dtype=torch.float32)
        acc = kept_sum = None
        for k in range(len(contributions)):
            above = below.add(mass[k])
            kept = torch.sub(above.clamp(max=hi), below.clamp(min=lo)).clamp_(min=0)
            term = torch.mul(kept, values[k])
            acc = term if acc is None else acc.add_(term)
            kept_sum = kept if kept_sum is None else kept_sum.add_(kept)
            below = above
        torch.div(acc, kept_sum, out=out[a:b])
    return out.reshape(contributions[0][1].shape)


def weighted_median(contributions: Sequence[tuple[float, torch.Tensor]]) -> torch.Tensor:
    """Per coordinate, the lowest value v_k (sorted ascending, stable) whose cumulative float32
    weight C_k reaches half the total weight."""
    weights_f32 = _checked(contributions, "weighted_median")
    half = float(np.float32(total_weight(weights_f32)) / np.float32(2))
    out = torch.empty(contributions[0][1].numel(), dtype=torch.float32)
    for a, b, values, mass in _sorted_columns(contributions, weights_f32):
        cum = torch.zeros(b - a, dtype=torch.float32)
        below_half = torch.zeros(b - a, dtype=torch.int64)
        for k in range(len(contributions)):
            cum.add_(mass[k])
            below_half.add_(cum < half)
        below_half.clamp_(max=len(contributions) - 1)
        out[a:b] = values.gather(0, below_half.unsqueeze(0))[0]
    return out.reshape(contributions[0][1].shape)


def _norm(x: torch.Tensor) -> float:
    """||x||_2 from float64 squares summed by numpy (pairwise, one thread) in fixed chunks added
    in order: the same double on every machine and thread count."""
    flat = x.reshape(-1).numpy()
    total = 0.0
    for a in range(0, flat.size, NORM_CHUNK):
        total += float(np.square(flat[a:a + NORM_CHUNK], dtype=np.float64).sum())
    return math.sqrt(total)


def _weighted_median_scalar(values: list[float], weights: list[float]) -> float:
    half, cum = sum(weights) / 2, 0.0
    for value, weight in sorted(zip(values, weights, strict=True), key=lambda vw: vw[0]):
        cum += weight
        if cum >= half:
            return value
    return max(values)


def centered_clip(contributions: Sequence[tuple[float, torch.Tensor]], clip_tau: float = 1.0,
                  clip_iters: int = 3) -> torch.Tensor:
    """Weighted centered clipping (Karimireddy et al. 2021, as BTARD runs it on each peer's part,
    Gorbunov et al. 2022): from v = the per-coordinate `weighted_median`, `clip_iters` times
        v <- v + sum_i (w_i / W) * (x_i - v) * min(1, tau / ||x_i - v||)
    with the norm over the whole shard. tau = clip_tau * the weighted median of ||x_i - v_0||
    (the median's distance to a typical contribution), fixed before the first step: a scale the
    honest majority sets, so any one contribution moves v by at most w_i / W * tau a step
    whatever its size. A contribution whose difference overflows float32 is left out of a step.

    Each step's coefficients w_i / W * min(...) are computed in double and rounded once to
    float32; the step is summed in the given order. Fewer than 3 contributions: `weighted_mean`."""
    weights_f32 = _checked(contributions, "centered_clip")
    if not (math.isfinite(clip_tau) and clip_tau > 0) or isinstance(clip_iters, bool) or clip_iters < 1:
        raise ValueError(f"centered_clip needs clip_tau > 0 and clip_iters >= 1, got {clip_tau!r}, {clip_iters!r}")
    if len(contributions) < MIN_ROBUST:
        return weighted_mean(contributions)
    total = sum(weights_f32)
    xs = [x.reshape(-1) for _, x in contributions]
    v = weighted_median(contributions).reshape(-1)
    diff, step = torch.empty_like(v), torch.empty_like(v)
    dists = [_norm(torch.sub(x, v, out=diff)) for x in xs]
    tau = clip_tau * _weighted_median_scalar(dists, weights_f32)
    for iteration in range(clip_iters):
        coeffs = [float(np.float32(weight / total * (1.0 if dist <= tau else tau / dist)))
                  if math.isfinite(dist) else 0.0 for weight, dist in zip(weights_f32, dists, strict=True)]
        step.zero_()
        for coeff, x in zip(coeffs, xs, strict=True):
            if coeff != 0.0:
                step.add_(torch.sub(x, v, out=diff).mul_(coeff))
        v.add_(step)
        if iteration + 1 < clip_iters:
            dists = [_norm(torch.sub(x, v, out=diff)) for x in xs]
    return v.reshape(contributions[0][1].shape)


Aggregator = Callable[[Sequence[tuple[float, torch.Tensor]]], torch.Tensor]


def aggregator(name: str, trim_fraction: float = 0.2, clip_tau: float = 1.0, clip_iters: int = 3) -> Aggregator:
    """The reduction a run's spec names (RunSpec.aggregator and its parameters)."""
    if name == "mean":
        return weighted_mean
    if name == "trimmed-mean":
        return lambda contributions: weighted_trimmed_mean(contributions, trim_fraction)
    if name == "centered-clip":
        return lambda contributions: centered_clip(contributions, clip_tau, clip_iters)
    raise ValueError(f"unknown aggregator {name!r}; expected mean, trimmed-mean or centered-clip")
