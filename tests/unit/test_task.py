"""The built-in task: model presets and init, corpus loading and held-out split, batch streams, LR schedule."""

from __future__ import annotations

import hashlib
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from peer.tasks import (
    PRESETS,
    BatchStream,
    ByteCorpus,
    GPTConfig,
    build_model,
    eval_batches,
    inner_lr,
    start_position,
)
from peer.tasks.data import MIN_CORPUS_BYTES

pytestmark = pytest.mark.timeout(120)

PARAM_RANGES = {"tiny": (50_000, 150_000), "small": (1_000_000, 5_000_000), "base": (10_000_000, 20_000_000)}
REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def stdlib() -> ByteCorpus:
    return ByteCorpus.load(None)


def params_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in model.state_dict().items():
        h.update(name.encode())
        h.update(p.detach().cpu().numpy().tobytes())
    return h.hexdigest()


# ---- model ----


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_param_counts_in_stated_range(preset: str) -> None:
    n = build_model(preset, seed=0).num_params()
    print(f"{preset}: {n} params")
    low, high = PARAM_RANGES[preset]
    assert low <= n <= high


def test_build_model_is_deterministic_and_leaves_global_rng_alone() -> None:
    rng_before = torch.get_rng_state()
    a, b, c = build_model("tiny", 1), build_model("tiny", 1), build_model("tiny", 2)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert params_digest(a) == params_digest(b)
    assert params_digest(a) != params_digest(c)
    assert all(p.dtype == torch.float32 for p in a.parameters())
    assert a.lm_head.weight is a.wte.weight  # tied


def test_init_bits_do_not_depend_on_cpu_vector_kernels() -> None:
    """torch.randn differs between ATEN_CPU_CAPABILITY=default and avx2; our init must not."""
    code = "from peer.tasks import build_model\nfrom tests.unit.test_task import params_digest\nprint(params_digest(build_model('small', 7)))"
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == params_digest(build_model("small", 7))


def test_init_statistics() -> None:
    model = build_model("small", 0)
    w = model.blocks[0].mlp.c_fc.weight
    assert abs(w.mean().item()) < 1e-3 and abs(w.std().item() - 0.02) < 1e-3
    proj = model.blocks[0].mlp.c_proj.weight
    assert abs(proj.std().item() - 0.02 / math.sqrt(2 * 4)) < 1e-3
    assert torch.all(model.blocks[0].ln_1.weight == 1) and torch.all(model.blocks[0].attn.c_attn.bias == 0)


def test_unknown_preset_and_bad_config_raise() -> None:
    with pytest.raises(ValueError, match="tiny"):
        build_model("huge", 0)
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(n_layer=1, n_head=3, n_embd=64, block_size=8)


def test_forward_shapes_and_block_size_check() -> None:
    model = build_model("tiny", 0)
    idx = torch.randint(0, 256, (3, 17))
    logits, loss = model(idx)
    assert logits.shape == (3, 17, 256) and loss is None
    _, loss = model(idx, idx)
    assert loss is not None and loss.shape == ()
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, model.config.block_size + 1, dtype=torch.long))


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_loss_at_init_is_near_uniform(preset: str) -> None:
    """On bytes with no structure the untrained model must be close to uniform: ln 256 nats."""
    model = build_model(preset, 0)
    gen = torch.Generator().manual_seed(0)
    x, y = (torch.randint(0, 256, (4, model.config.block_size), generator=gen) for _ in range(2))
    with torch.no_grad():
        _, loss = model(x, y)
    print(f"{preset}: init loss on random bytes {loss.item():.3f} nats, ln 256 = {math.log(256):.3f}")
    assert abs(loss.item() - math.log(256)) < 0.3


def test_loss_at_init_on_text(stdlib: ByteCorpus) -> None:
    """Tied embeddings make an untrained model favour repeating the current byte, which Python's
    indentation rewards, so on stdlib text the start is a little below ln 256 (0.2 nats for tiny)."""
    x, y = eval_batches(stdlib.heldout, 8, 64, 1)[0]
    with torch.no_grad():
        _, loss = build_model("tiny", 0)(x, y)
    assert abs(loss.item() - math.log(256)) < 0.3


def test_thirty_adamw_steps_lower_the_loss(stdlib: ByteCorpus) -> None:
    torch.manual_seed(0)
    model = build_model("tiny", 0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    stream = BatchStream(stdlib.train, 16, 64, start_position(len(stdlib.train), "test"))
    losses = []
    for _ in range(30):
        _, loss = model(*stream.next_batch())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    print(f"train loss {losses[0]:.3f} -> {np.mean(losses[-5:]):.3f}")
    assert np.mean(losses[-5:]) < losses[0] - 1.5


# ---- corpus ----


def test_stdlib_corpus(stdlib: ByteCorpus) -> None:
    print(stdlib)
    assert "stdlib" in stdlib.name
    assert len(stdlib.train) > 1_000_000 and stdlib.train.dtype == np.uint8
    assert len(stdlib.heldout) > 0
    total = len(stdlib.train) + len(stdlib.heldout)
    assert abs(len(stdlib.heldout) / total - 0.02) < 0.001
    assert b"def " in stdlib.heldout[:50_000].tobytes()


def test_stdlib_loads_fast_and_respects_max_bytes() -> None:
    t0 = time.perf_counter()
    ByteCorpus.load(None, max_bytes=16 * 2**20)
    elapsed_s = time.perf_counter() - t0
    print(f"stdlib load: {elapsed_s:.3f} s")
    assert elapsed_s < 2.0
    small = ByteCorpus.load(None, max_bytes=2**20)
    assert len(small.train) + len(small.heldout) == 2**20


def test_unigram_entropy_of_heldout_stdlib(stdlib: ByteCorpus) -> None:
    entropy_nats = stdlib.unigram_entropy_nats()
    print(f"held-out unigram entropy: {entropy_nats:.4f} nats ({len(stdlib.heldout)} bytes)")
    assert 3.0 < entropy_nats < 6.0


def test_heldout_is_disjoint_from_train(tmp_path: Path) -> None:
    lines = [f"line {i:07d}\n".encode() for i in range(40_000)]  # 520 KB: 2 held-out pieces of 5200 B
    (tmp_path / "numbered.txt").write_bytes(b"".join(lines))
    corpus = ByteCorpus.load(str(tmp_path / "numbered.txt"))

    def whole_lines(arr: np.ndarray) -> set[bytes]:
        return {ln for ln in arr.tobytes().split(b"\n") if len(ln) == 12}

    train, heldout = whole_lines(corpus.train), whole_lines(corpus.heldout)
    assert not train & heldout
    assert len(train) + len(heldout) > 0.99 * len(lines)
    assert 0.015 < len(heldout) / len(lines) < 0.025


def test_load_directory_sorted_and_hidden_skipped(tmp_path: Path) -> None:
    files = {"b.txt": b"B" * 5000, "a/z.txt": b"Z" * 3000, "a.txt": b"A" * 2000, ".git/x": b"X" * 999}
    for rel, content in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(content)
    corpus = ByteCorpus.load(str(tmp_path))
    expected = b"A" * 2000 + b"Z" * 3000 + b"B" * 5000  # sorted: a.txt < a/z.txt < b.txt
    # small corpora hold out one 1 KiB piece at the very end
    assert corpus.train.tobytes() == expected[:-1024]
    assert corpus.heldout.tobytes() == expected[-1024:]


def test_load_errors_name_the_path(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope")
    with pytest.raises(ValueError, match="nope"):
        ByteCorpus.load(missing)
    (tmp_path / "small.txt").write_bytes(b"x" * (MIN_CORPUS_BYTES - 1))
    with pytest.raises(ValueError, match="small.txt"):
        ByteCorpus.load(str(tmp_path / "small.txt"))


# ---- batches ----


def test_batch_stream_wraps_around() -> None:
    train = np.arange(10, dtype=np.uint8)
    stream = BatchStream(train, batch_size=2, seq_len=4, start=8)
    x, y = stream.next_batch()
    assert x.dtype == torch.int64 and x.shape == (2, 4)
    assert x.tolist() == [[8, 9, 0, 1], [3, 4, 5, 6]]  # row 1 starts len // batch_size = 5 further on
    assert y.tolist() == [[9, 0, 1, 2], [4, 5, 6, 7]]
    assert stream.position == 2


def test_batch_stream_resumes_exactly(stdlib: ByteCorpus) -> None:
    stream = BatchStream(stdlib.train, 8, 32, start=len(stdlib.train) - 100)
    for _ in range(3):
        stream.next_batch()
    state = stream.state_dict()
    assert all(type(v) is int for v in state.values())
    expected = [stream.next_batch() for _ in range(2)]
    resumed = BatchStream(stdlib.train, 8, 32, start=0)
    resumed.load_state_dict(state)
    for (x, y), (ex, ey) in zip([resumed.next_batch() for _ in range(2)], expected, strict=True):
        assert torch.equal(x, ex) and torch.equal(y, ey)
    with pytest.raises(ValueError, match="training bytes"):
        BatchStream(stdlib.train[:-1], 8, 32).load_state_dict(state)


def test_start_position_is_deterministic_per_key() -> None:
    a, b = start_position(1_000_003, "peer-a"), start_position(1_000_003, "peer-b")
    assert a == start_position(1_000_003, "peer-a") and a != b
    assert 0 <= a < 1_000_003 and 0 <= b < 1_000_003


def test_eval_batches_are_fixed_and_evenly_spaced(stdlib: ByteCorpus) -> None:
    batches = eval_batches(stdlib.heldout, 4, 64, max_batches=3)
    assert len(batches) == 3 and all(x.shape == (4, 64) for x, _ in batches)
    again = eval_batches(stdlib.heldout, 4, 64, max_batches=3)
    assert all(
        torch.equal(x, x2) and torch.equal(y, y2) for (x, y), (x2, y2) in zip(batches, again, strict=True)
    )
    assert torch.equal(batches[0][0][0], torch.from_numpy(stdlib.heldout[:64].astype(np.int64)))
    assert torch.equal(batches[-1][1][-1], torch.from_numpy(stdlib.heldout[-64:].astype(np.int64)))
    short = eval_batches(np.arange(200, dtype=np.uint8), 4, 64, max_batches=10)  # only 3 windows fit
    assert [x.shape[0] for x, _ in short] == [3]


# ---- schedule ----


def test_inner_lr_warmup_and_cosine() -> None:
    lr = dict(base_lr=1e-3, warmup_samples=100, total_samples=1100, min_lr_ratio=0.1)
    assert inner_lr(0, **lr) == pytest.approx(1e-5)
    assert inner_lr(99, **lr) == pytest.approx(1e-3)
    assert inner_lr(100, **lr) == pytest.approx(1e-3)
    assert inner_lr(600, **lr) == pytest.approx(0.55e-3)
    assert inner_lr(1100, **lr) == pytest.approx(1e-4)
    assert inner_lr(10**9, **lr) == pytest.approx(1e-4)
    values = [inner_lr(s, **lr) for s in range(100, 1200, 10)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))
    assert inner_lr(5, base_lr=1.0, warmup_samples=0, total_samples=10) < 1.0


@pytest.mark.parametrize(
    "args",
    [(-1, 1e-3, 10, 100), (0, 1e-3, 200, 100), (0, -1.0, 10, 100), (0, 1e-3, -1, 100), (0, 1e-3, 0, 0)],
)
def test_inner_lr_rejects_nonsense(args: tuple) -> None:
    with pytest.raises(ValueError):
        inner_lr(*args)
