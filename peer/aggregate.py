"""Weighted means over float32 shards, reduced in the caller's (sorted member) order.

Pure CPU torch with single-rounding float32 ops only, so every machine gets the same bytes; no net code.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence

import numpy as np
import torch


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


def weighted_mean(contributions: Sequence[tuple[float, torch.Tensor]]) -> torch.Tensor:
    """sum_i(w_i * x_i) / sum_i(w_i) as a new float32 tensor, summed in the given order.

    Each product, each add and the final divide is one float32 rounding. Inputs are never mutated.
    """
    if not contributions:
        raise ValueError("weighted_mean needs at least one contribution")
    shape = contributions[0][1].shape
    for index, (_, x) in enumerate(contributions):
        if x.dtype != torch.float32 or x.device.type != "cpu" or x.shape != shape:
            raise ValueError(
                f"contribution {index}: expected float32 CPU tensor of shape {tuple(shape)}, "
                f"got {x.dtype} on {x.device} of shape {tuple(x.shape)}"
            )
    weights_f32 = [_weight_f32(weight) for weight, _ in contributions]
    acc = torch.mul(contributions[0][1], weights_f32[0])
    term = torch.empty_like(acc) if len(contributions) > 1 else acc
    for weight_f32, (_, x) in zip(weights_f32[1:], contributions[1:], strict=True):
        acc.add_(torch.mul(x, weight_f32, out=term))   # the same ops in the same order, into two buffers
    return acc.div_(total_weight(weights_f32))
