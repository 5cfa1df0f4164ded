"""Outer step against torch.optim.SGD, flat parameters, digest, and same bytes on every CPU path."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import blake3
import pytest
import torch

from peer.outer import (
    GlobalState,
    assign_flat_,
    digest,
    flatten_params,
    num_params,
    outer_step,
    pseudo_gradient,
)

pytestmark = pytest.mark.timeout(120)

REPO_ROOT = Path(__file__).resolve().parents[2]


def randn(numel: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(numel, generator=torch.Generator().manual_seed(seed)) * scale


def test_outer_step_matches_torch_sgd_nesterov() -> None:
    theta, momentum = randn(10_007, seed=0), torch.zeros(10_007)
    param = torch.nn.Parameter(theta.clone())
    sgd = torch.optim.SGD([param], lr=0.7, momentum=0.9, nesterov=True)
    for step in range(5):
        grad = randn(10_007, seed=100 + step, scale=0.01)
        param.grad = grad.clone()
        sgd.step()
        theta, momentum = outer_step(theta, momentum, grad, lr=0.7, momentum_coef=0.9)
        torch.testing.assert_close(theta, param.detach(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(momentum, sgd.state[param]["momentum_buffer"], rtol=1e-6, atol=1e-7)


def test_outer_step_first_step_and_inputs_untouched() -> None:
    theta, grad = randn(1000, seed=1), randn(1000, seed=2)
    momentum = torch.zeros(1000)
    before = (theta.clone(), momentum.clone(), grad.clone())
    new_theta, new_momentum = outer_step(theta, momentum, grad, lr=0.5, momentum_coef=0.9)
    assert torch.equal(new_momentum, grad)  # SGD's first buffer is the gradient itself
    assert torch.equal(new_theta, theta - 0.5 * (grad + 0.9 * grad))  # here every op is exact or identical
    assert all(torch.equal(a, b) for a, b in zip((theta, momentum, grad), before, strict=True))
    with pytest.raises(ValueError, match="one length"):
        outer_step(theta, torch.zeros(999), grad, lr=0.5, momentum_coef=0.9)
    with pytest.raises(ValueError, match="lr must be finite"):
        outer_step(theta, momentum, grad, lr=float("nan"), momentum_coef=0.9)


def test_pseudo_gradient() -> None:
    theta_r, local = randn(100, seed=3), randn(100, seed=4)
    assert torch.equal(pseudo_gradient(theta_r, local), theta_r - local)
    with pytest.raises(ValueError):
        pseudo_gradient(theta_r, local.double())


def test_flatten_and_assign_round_trip() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)).double()
    flat = flatten_params(model)
    assert flat.dtype == torch.float32 and flat.shape == (num_params(model),) == (3 * 4 + 4 + 4 * 2 + 2,)
    assert torch.equal(flat[:12], model[0].weight.detach().reshape(-1).float())
    new_flat = torch.arange(num_params(model), dtype=torch.float32)
    assign_flat_(model, new_flat)
    assert model[0].weight.dtype == torch.float64
    assert torch.equal(flatten_params(model), new_flat)
    new_flat[0] = -1.0  # the model holds a copy
    assert float(model[0].weight.detach()[0, 0]) == 0.0
    with pytest.raises(ValueError, match=r"expected \(26,\)"):
        assign_flat_(model, torch.zeros(25))


def test_digest_covers_every_field() -> None:
    theta, momentum = randn(1000, seed=5), randn(1000, seed=6)
    base = digest(theta, momentum, round=7, global_samples=123_456)
    manual = blake3.blake3(
        struct.pack("<qq", 7, 123_456) + theta.numpy().tobytes() + momentum.numpy().tobytes()
    )
    assert base == manual.hexdigest()
    flipped = theta.clone()
    flipped.view(torch.int32)[500] ^= 1  # one bit of one value
    assert digest(flipped, momentum, 7, 123_456) != base
    assert digest(theta, momentum, 8, 123_456) != base
    assert digest(theta, momentum, 7, 123_457) != base
    assert digest(momentum, theta, 7, 123_456) != base


def test_global_state_clone_is_independent() -> None:
    state = GlobalState(theta=randn(10, seed=7), momentum=torch.zeros(10), round=3, global_samples=99)
    copy = state.clone()
    copy.theta[0] += 1.0
    assert not torch.equal(copy.theta, state.theta)
    assert state.clone().digest() == state.digest() == digest(state.theta, state.momentum, 3, 99)


# Encode, average (mean, trimmed mean, centered clip) and step on ~1e6 values; print the CPU path torch used and a hash of all bytes made.
# Inputs come from numpy so that only our code runs under the capability being tested.
BYTES_SCRIPT = """
import hashlib, numpy as np, torch
from peer.aggregate import centered_clip, weighted_mean, weighted_trimmed_mean
from peer.codecs import get_codec
from peer.outer import digest, outer_step
numel, rng, codec, h = 1_000_003, np.random.default_rng(1234), get_codec("int8"), hashlib.sha256()
def normal(scale):
    return torch.from_numpy(rng.standard_normal(numel, dtype=np.float32) * np.float32(scale))
decoded = []
for _ in range(3):
    data = codec.encode(normal(0.01))
    h.update(data)
    decoded.append(codec.decode(data, numel))
avg = weighted_mean(list(zip([3.0, 1.0, 7.5], decoded)))
h.update(avg.numpy().tobytes())
theta, momentum = normal(1.0), torch.zeros(numel)
for grad in (avg, decoded[0], decoded[2]):
    theta, momentum = outer_step(theta, momentum, grad, lr=0.7, momentum_coef=0.9)
    h.update(digest(theta, momentum, 0, 0).encode())
liar = (2.0, normal(1.0))   # the robust reductions, one outlier among four
robust = list(zip([3.0, 1.0, 7.5], decoded)) + [liar]
h.update(weighted_trimmed_mean(robust, 0.2).numpy().tobytes())
h.update(centered_clip(robust).numpy().tobytes())
print(torch.backends.cpu.get_cpu_capability(), h.hexdigest())
"""


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return {
        flag for line in text.splitlines() if line.startswith("flags") for flag in line.split(":")[1].split()
    }


def run_with_capability(capability: str) -> tuple[str, str]:
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-c", BYTES_SCRIPT],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert done.returncode == 0, done.stderr
    used, hex_digest = done.stdout.split()
    return used, hex_digest


def test_same_bytes_on_every_cpu_capability() -> None:
    flags = cpu_flags()
    if "avx2" not in flags:
        pytest.skip(
            "/proc/cpuinfo lists no avx2 (or is unreadable): nothing to compare the default path with"
        )
    capabilities = ["default", "avx2"] + (["avx512"] if {"avx512f", "avx512bw", "avx512vl"} <= flags else [])
    results = {capability: run_with_capability(capability) for capability in capabilities}
    for capability, (used, _) in results.items():
        assert used.lower() == capability, f"asked torch for {capability}, it ran {used}"
    assert len({hex_digest for _, hex_digest in results.values()}) == 1, results


def _old_formula(theta, momentum, grad, lr, coef):
    """The outer step with a new tensor per op, as it was first written."""
    lr, coef = float(torch.tensor(lr, dtype=torch.float32)), float(torch.tensor(coef, dtype=torch.float32))
    new_momentum = torch.add(torch.mul(momentum, coef), grad)
    return torch.sub(theta, torch.mul(torch.add(grad, torch.mul(new_momentum, coef)), lr)), new_momentum


@pytest.mark.parametrize("numel", [1, 7, 4099, 300_001])
def test_in_place_outer_step_is_bitwise_the_old_formula(numel: int) -> None:
    """The in-place path (out= into one new buffer, a recycled dirty scratch) gives the bytes of
    the formula with a new tensor per op, over several steps on random and heavy-tailed inputs,
    and stays within rounding of torch.optim.SGD(nesterov=True)."""
    gen = torch.Generator().manual_seed(numel)
    theta = torch.randn(numel, generator=gen)
    momentum = torch.zeros(numel)
    old_theta, old_momentum = theta.clone(), momentum.clone()
    param = torch.nn.Parameter(theta.clone())
    sgd = torch.optim.SGD([param], lr=0.7, momentum=0.9, nesterov=True, foreach=False)
    scratch = torch.full((numel,), float("nan"))   # recycled: its old contents must not matter
    for step in range(4):
        grad = torch.randn(numel, generator=gen) * 0.01
        if step % 2:   # heavy-tailed: a few values many orders of magnitude larger
            grad = grad / torch.rand(numel, generator=gen).clamp_min(1e-6)
        before = (theta.clone(), momentum.clone(), grad.clone())
        theta, momentum = outer_step(theta, momentum, grad, 0.7, 0.9, scratch=scratch)
        assert all(torch.equal(a, b) for a, b in zip(before[:2], (old_theta, old_momentum), strict=True))
        assert torch.equal(grad, before[2])
        old_theta, old_momentum = _old_formula(old_theta, old_momentum, grad, 0.7, 0.9)
        assert theta.numpy().tobytes() == old_theta.numpy().tobytes()
        assert momentum.numpy().tobytes() == old_momentum.numpy().tobytes()
        param.grad = grad.clone()
        sgd.step()
        # SGD scales with alpha= (a fused multiply-add on some paths): equal within rounding, not bitwise
        torch.testing.assert_close(theta, param.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(momentum, sgd.state[param]["momentum_buffer"], rtol=1e-5, atol=1e-6)
        # theta and momentum are views of one new buffer, in that order (a snapshot serves it as is)
        assert momentum.data_ptr() == theta.data_ptr() + 4 * numel
        assert theta.untyped_storage().data_ptr() != scratch.untyped_storage().data_ptr()
    with pytest.raises(ValueError, match="scratch"):
        outer_step(theta, momentum, grad, 0.7, 0.9, scratch=torch.empty(numel + 1))
