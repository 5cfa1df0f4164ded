"""The built-in model: a small byte-level GPT (nanoGPT-like), its presets and a portable init.

Pure torch, CPU or GPU; knows nothing of data, optimizers or the network.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class GPTConfig:
    n_layer: int
    """Number of transformer blocks."""
    n_head: int
    """Attention heads per block; must divide n_embd."""
    n_embd: int
    """Width of the residual stream."""
    block_size: int
    """Longest sequence the model accepts (learned positions)."""
    vocab_size: int = 256
    """Bytes."""

    def __post_init__(self) -> None:
        if min(self.n_layer, self.n_head, self.n_embd, self.block_size, self.vocab_size) < 1:
            raise ValueError(f"GPTConfig fields must be positive: {self}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")


PRESETS: dict[str, GPTConfig] = {
    "tiny": GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=64),  # tests: ~0.12M params
    "small": GPTConfig(n_layer=4, n_head=4, n_embd=256, block_size=128),  # default: ~3.2M params
    "base": GPTConfig(n_layer=8, n_head=6, n_embd=384, block_size=256),  # ~14.4M params
}


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Pre-LayerNorm decoder with learned positions and tied input/output embeddings."""

    def __init__(self, config: GPTConfig, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight
        self._init_weights(generator)

    @torch.no_grad()
    def _init_weights(self, generator: torch.Generator | None) -> None:
        """N(0, 0.02) weights, residual projections scaled by 1/sqrt(2 n_layer), zero biases, unit LN."""
        proj_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for name, p in self.named_parameters():  # registration order; the tied weight appears once
            if name.endswith("bias"):
                p.zero_()
            elif ".ln_" in name or name.startswith("ln_"):
                p.fill_(1.0)
            else:
                std = proj_std if name.endswith("c_proj.weight") else 0.02
                p.copy_(_portable_normal(p.shape, std, generator))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx, targets: int64 [B, T] bytes -> (logits [B, T, vocab], mean cross-entropy in nats or None)."""
        T = idx.shape[1]
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))


def _portable_normal(shape: torch.Size, std: float, generator: torch.Generator | None) -> torch.Tensor:
    """Irwin-Hall(12) approximation of N(0, std^2), bit-identical on every CPU.

    torch.normal_ is not: its AVX2 kernel uses its own log/sincos, so x86 and ARM peers would
    start from different weights. Here: integer draws (mt19937), an exact integer sum and one
    float64 multiply, all correctly rounded. Tails are cut at 6 std, harmless for an init.
    """
    n = math.prod(shape)
    draws = torch.randint(0, 2**24, (12, n), generator=generator, dtype=torch.int32)
    centered = draws.sum(dim=0, dtype=torch.int32) - 6 * (2**24 - 1)  # exact (< 2**28); variance ~ 2**48
    return (centered.to(torch.float64) * (std / 2**24)).to(torch.float32).view(shape)


def build_model(preset: str, seed: int) -> GPT:
    """The model for a preset, on CPU in float32; same (preset, seed) -> same bits on any machine.

    Leaves the global torch RNG as it found it.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose one of {sorted(PRESETS)}")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # nn.Linear's own default init draws from the global RNG
        return GPT(PRESETS[preset], generator=generator)
