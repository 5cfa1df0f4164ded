"""Global state, pseudo-gradient, Nesterov outer step and state digest.

Pure CPU torch with single-rounding float32 ops only, so every machine gets the same bytes; no net code.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

import blake3
import numpy as np
import torch

from peer.hostmem import empty_f32


@dataclass
class GlobalState:
    """What every peer holds identically after every round."""

    theta: torch.Tensor
    """Flat float32 CPU parameters."""
    momentum: torch.Tensor
    """Flat float32 CPU Nesterov buffer, same length as theta (zeros at the start)."""
    round: int
    """Rounds applied so far."""
    global_samples: int
    """Samples the swarm has trained on; drives the inner learning-rate schedule."""

    def clone(self) -> GlobalState:
        return GlobalState(self.theta.clone(), self.momentum.clone(), self.round, self.global_samples)

    _digest: str = field(default="", init=False, repr=False, compare=False)

    def digest(self) -> str:
        """Computed once: a GlobalState's tensors are never changed in place (every step makes new ones)."""
        if not self._digest:
            self._digest = digest(self.theta, self.momentum, self.round, self.global_samples)
        return self._digest


Params = torch.nn.Module | Sequence[torch.Tensor]
"""A model (its parameters(), in order; a tied one once) or the list of parameters that travel."""


def _params(params: Params) -> list[torch.Tensor]:
    return list(params.parameters()) if isinstance(params, torch.nn.Module) else list(params)


def num_params(params: Params) -> int:
    return sum(p.numel() for p in _params(params))


def flatten_params(params: Params, out: torch.Tensor | None = None) -> torch.Tensor:
    """The parameters as one flat float32 CPU tensor, in order: a new one, or written into `out`
    (pinned host memory for a GPU model: the copies are asynchronous, then waited for)."""
    ps = _params(params)
    if out is None:
        parts = [p.detach().reshape(-1).to("cpu", torch.float32) for p in ps]
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.float32)
    _check_length(out, num_params(ps))
    offset = 0
    for p in ps:
        out[offset : offset + p.numel()].view_as(p).copy_(p.detach(), non_blocking=True)
        offset += p.numel()
    if any(p.device.type == "cuda" for p in ps):
        torch.cuda.synchronize()
    return out


@torch.no_grad()
def assign_flat_(params: Params, flat: torch.Tensor) -> None:
    """Copy flat into the parameters, in order, keeping each parameter's device and dtype."""
    ps = _params(params)
    _check_length(flat, num_params(ps))
    offset = 0
    for p in ps:
        p.copy_(flat[offset : offset + p.numel()].view_as(p), non_blocking=flat.is_pinned())
        offset += p.numel()
    if flat.is_pinned() and any(p.device.type == "cuda" for p in ps):
        torch.cuda.synchronize()  # flat may be reused (a staging buffer) once this returns


def _check_length(flat: torch.Tensor, expected: int) -> None:
    if flat.dim() != 1 or flat.numel() != expected:
        raise ValueError(f"flat has shape {tuple(flat.shape)}, expected ({expected},) for this model")


def pseudo_gradient(theta_r: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """theta_r - local: the outer gradient of this peer's round."""
    _check_flat(theta_r=theta_r, local=local)
    return torch.sub(theta_r, local, out=empty_f32(theta_r.numel()))


def outer_step(
    theta: torch.Tensor, momentum: torch.Tensor, grad: torch.Tensor, lr: float, momentum_coef: float,
    scratch: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nesterov SGD, as torch.optim.SGD(nesterov=True) computes it, in single-rounding float32 ops.

    buf = momentum_coef * buf + grad; g = grad + momentum_coef * buf; theta = theta - lr * g.
    Returns (new_theta, new_momentum), new tensors; inputs are not touched. The two are views of
    one new buffer, theta then momentum (a snapshot serves it without a copy, state_sync.py);
    the intermediate g lives in `scratch` when given (a float32 buffer of theta's length that
    nothing else reads: the caller recycles it), else in a new one. The ops and their order are
    those of the formula with a new tensor per op, each writing its result in place: the same
    bytes (tests/unit/test_outer.py holds them equal).
    """
    _check_flat(theta=theta, momentum=momentum, grad=grad)
    lr_f32, coef_f32 = _scalar_f32("lr", lr), _scalar_f32("momentum_coef", momentum_coef)
    n = theta.numel()
    if scratch is None:
        scratch = empty_f32(n)
    _check_flat(theta=theta, scratch=scratch)
    pair = empty_f32(2 * n)   # on huge pages: a fresh state's page faults were a third of this step
    new_theta, new_momentum = pair[:n], pair[n:]
    torch.mul(momentum, coef_f32, out=new_momentum)
    torch.add(new_momentum, grad, out=new_momentum)
    torch.mul(new_momentum, coef_f32, out=scratch)
    torch.add(grad, scratch, out=scratch)
    torch.mul(scratch, lr_f32, out=scratch)
    torch.sub(theta, scratch, out=new_theta)
    return new_theta, new_momentum


def digest(theta: torch.Tensor, momentum: torch.Tensor, round: int, global_samples: int) -> str:
    """BLAKE3-256 hex (protocol 2; sha256 before) of round and global_samples (little-endian int64), then
    theta's and momentum's float32 bytes. Every peer hashes every new state: on the base preset BLAKE3
    takes 28 ms a round where sha256 took 67 ms (the largest part of bench/round_overhead.py's host work)."""
    _check_flat(theta=theta, momentum=momentum)
    h = blake3.blake3(struct.pack("<qq", round, global_samples))
    for t in (theta, momentum):
        h.update(np.ascontiguousarray(t.detach().numpy(), dtype="<f4").view(np.uint8))   # blake3 takes bytes
    return h.hexdigest()


def _scalar_f32(name: str, value: float) -> float:
    """value rounded to float32, so the scalar is the same whatever path torch takes."""
    value_f32 = float(np.float32(value))
    if not math.isfinite(value_f32):
        raise ValueError(f"{name} must be finite in float32, got {value!r}")
    return value_f32


def _check_flat(**tensors: torch.Tensor) -> None:
    """ValueError unless all tensors are 1-D float32 CPU tensors of one length."""
    lengths = {t.numel() for t in tensors.values()}
    for name, t in tensors.items():
        if t.dim() != 1 or t.dtype != torch.float32 or t.device.type != "cpu" or len(lengths) != 1:
            shapes = ", ".join(f"{k} {tuple(v.shape)} {v.dtype} {v.device}" for k, v in tensors.items())
            raise ValueError(f"{name}: expected 1-D float32 CPU tensors of one length, got {shapes}")
