"""The inner learning-rate schedule: linear warmup, then cosine decay to a floor, counted in samples.

A pure function of its arguments; owns no optimizer and no state.
"""

from __future__ import annotations

import math


def inner_lr(
    samples: int, base_lr: float, warmup_samples: int, total_samples: int, min_lr_ratio: float = 0.1
) -> float:
    """Learning rate after `samples` training samples (this peer's, or the swarm's: the caller decides).

    Warmup: base_lr * (samples + 1) / warmup_samples, reaching base_lr at samples = warmup_samples - 1.
    Then cosine from base_lr at warmup_samples to base_lr * min_lr_ratio at total_samples, flat after.
    """
    if samples < 0 or warmup_samples < 0 or total_samples <= 0:
        raise ValueError(
            f"samples={samples}, warmup_samples={warmup_samples} must be >= 0, total_samples={total_samples} > 0"
        )
    if warmup_samples > total_samples:
        raise ValueError(f"warmup_samples={warmup_samples} exceeds total_samples={total_samples}")
    if not (math.isfinite(base_lr) and base_lr >= 0) or not 0 <= min_lr_ratio <= 1:
        raise ValueError(f"need base_lr >= 0 and 0 <= min_lr_ratio <= 1, got {base_lr}, {min_lr_ratio}")
    if samples < warmup_samples:
        return base_lr * (samples + 1) / warmup_samples
    min_lr = base_lr * min_lr_ratio
    if samples >= total_samples:
        return min_lr
    progress = (samples - warmup_samples) / (total_samples - warmup_samples)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
