"""Checkpoint files: exact round trips (AdamW included), damaged files refused, atomic saves, directory upkeep."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import pytest
import torch

from peer import checkpoint
from peer.checkpoint import Checkpoint, CheckpointError, checkpoint_path, latest, load, save, save_round
from peer.outer import GlobalState, assign_flat_, flatten_params, num_params
from tests.procs import start_proc, wait_for_line

pytestmark = pytest.mark.timeout(60)


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def small_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(7, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 3))


def train_steps(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: range) -> None:
    for step in steps:
        opt.zero_grad()
        model(randn(5, 7, seed=1000 + step)).pow(2).mean().backward()
        opt.step()


def make_ckpt(round: int = 12, run_id: str = "run-a", spec_hash: str = "spec-1", numel: int = 1001) -> Checkpoint:
    model = small_model(seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1)
    train_steps(model, opt, range(3))
    state = GlobalState(randn(numel, seed=round), randn(numel, seed=round + 1), round, 4096 * round + 7)
    return Checkpoint(
        state=state, run_id=run_id, spec_hash=spec_hash, peer_id="9f3a", optimizer=opt.state_dict(),
        data={"epoch": 2, "position": 123_456_789_012},
        residuals={"residual": randn(numel, seed=7)}, owner_residuals={"residual": randn(numel, seed=9)},
    )


def assert_identical(a: object, b: object, where: str = "ckpt") -> None:
    """Same structure, same types, same scalars, tensors bitwise equal (same dtype and shape)."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} vs {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert (a.dtype, a.shape) == (b.dtype, b.shape), where
        assert a.reshape(-1).view(torch.uint8).tolist() == b.reshape(-1).view(torch.uint8).tolist(), where
    elif isinstance(a, dict):
        assert list(a) == list(b), f"{where}: keys {list(a)} vs {list(b)}"
        for key in a:
            assert_identical(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_identical(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and a != a:
        assert b != b, where
    elif isinstance(a, (Checkpoint, GlobalState)):
        assert_identical(vars(a), vars(b), where)
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


def test_round_trip_is_exact(tmp_path: Path) -> None:
    ckpt = make_ckpt()
    num_bytes = save(tmp_path / "a.ckpt", ckpt)
    assert num_bytes == (tmp_path / "a.ckpt").stat().st_size
    loaded = load(tmp_path / "a.ckpt")
    assert_identical(ckpt, loaded)
    assert isinstance(loaded.optimizer["param_groups"][0]["betas"], tuple)
    assert list(loaded.optimizer["state"]) == [0, 1, 2, 3, 4, 5]  # int keys stay ints
    assert list(loaded.residuals) == list(loaded.owner_residuals) == ["residual"]
    assert loaded.state.digest() == ckpt.state.digest()


def test_odd_values_round_trip(tmp_path: Path) -> None:
    ckpt = make_ckpt(numel=0)
    ckpt.optimizer = {
        "floats": [float("inf"), float("-inf"), float("nan"), -0.0, 1e-310, 0.1],
        "nested": {(1, ("a", None)): (True, None, "x"), 3: {"deep": [[], ()]}, "3": 4},
        "x": {"y": torch.ones(2)}, "x/'y'": torch.zeros(2), "same": [torch.ones(1)] * 2,  # keys with / and quotes; one tensor twice
        "tensors": [torch.tensor(2.5, dtype=torch.float64), torch.empty(0, 4, dtype=torch.bfloat16),
                    torch.tensor([[True], [False]]), torch.arange(6, dtype=torch.int16).reshape(2, 3).t(),
                    torch.tensor([float("nan"), -0.0]), randn(3, 5, seed=3).half()],
    }
    save(tmp_path / "odd.ckpt", ckpt)
    assert_identical(ckpt, load(tmp_path / "odd.ckpt"))


def test_unsupported_content_is_refused_before_writing(tmp_path: Path) -> None:
    ckpt = make_ckpt()
    for bad in ({1, 2}, {(1, torch.ones(1)): 2}, torch.ones(2, dtype=torch.complex64)):
        ckpt.optimizer = {"bad": bad}
        with pytest.raises(TypeError, match="cannot checkpoint"):
            save(tmp_path / "a.ckpt", ckpt)
    assert list(tmp_path.iterdir()) == []


def test_adamw_resumes_bit_for_bit(tmp_path: Path) -> None:
    model = small_model(seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    train_steps(model, opt, range(4))
    ckpt = make_ckpt()
    ckpt.state = GlobalState(flatten_params(model), torch.zeros(num_params(model)), 4, 4 * 5)
    ckpt.optimizer = opt.state_dict()
    ckpt.residuals = ckpt.owner_residuals = {}  # none yet: a peer before its first applied round
    save(tmp_path / "a.ckpt", ckpt)
    loaded = load(tmp_path / "a.ckpt")

    resumed = small_model(seed=123)
    assign_flat_(resumed, loaded.state.theta)
    resumed_opt = torch.optim.AdamW(resumed.parameters(), lr=1.0)
    resumed_opt.load_state_dict(loaded.optimizer)
    train_steps(model, opt, range(4, 7))
    train_steps(resumed, resumed_opt, range(4, 7))
    assert torch.equal(flatten_params(model), flatten_params(resumed))
    assert_identical(opt.state_dict(), resumed_opt.state_dict())


def test_truncated_files_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "round-00000012.ckpt"
    size = save(path, make_ckpt())
    whole = path.read_bytes()
    for cut in (0, 7, 19, 20, 100, 300, size // 2, size - 33, size - 32, size - 1):
        path.write_bytes(whole[:cut])
        with pytest.raises(CheckpointError, match="truncated") as e:
            load(path)
        assert str(e.value).startswith(f"{path}: "), str(e.value)
    path.write_bytes(whole[: size // 2])
    with pytest.raises(CheckpointError, match=rf"truncated: {size // 2} of {size} bytes \(a crash cut it off\?\)"):
        load(path)


def test_flipped_bytes_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "a.ckpt"
    size = save(path, make_ckpt())
    whole = path.read_bytes()
    for at, match in [(size // 2, "sha256 mismatch"), (size - 1, "sha256 mismatch"), (size - 40, "sha256 mismatch"),
                      (0, "not a version 1 checkpoint"), (9, "not a version 1 checkpoint"), (12, "header is not checkpoint JSON"),
                      (17, "truncated or corrupt")]:
        flipped = bytearray(whole)
        flipped[at] ^= 0x10
        path.write_bytes(flipped)
        with pytest.raises(CheckpointError, match=match) as e:
            load(path)
        assert str(e.value).startswith(f"{path}: "), str(e.value)
    path.write_bytes(whole + b"\0")
    with pytest.raises(CheckpointError, match=f"1 bytes too long: {size + 1}, its header says {size}"):
        load(path)
    for at in range(20, 120, 7):  # inside the JSON header: some error, never a wrong checkpoint
        flipped = bytearray(whole)
        flipped[at] ^= 0x01
        path.write_bytes(flipped)
        with pytest.raises(CheckpointError):
            load(path)


def test_missing_file_is_a_checkpoint_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="cannot read it"):
        load(tmp_path / "nope.ckpt")


def test_latest_skips_a_truncated_newest_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    for round in (3, 4, 5):
        save_round(tmp_path, make_ckpt(round=round))
    newest = checkpoint_path(tmp_path, 5)
    newest.write_bytes(newest.read_bytes()[:1000])
    with caplog.at_level(logging.WARNING, logger="peer.checkpoint"):
        found = latest(tmp_path)
    assert found is not None and found.state.round == 4
    assert_identical(found, make_ckpt(round=4))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(newest) in warnings[0] and "truncated" in warnings[0], warnings
    assert newest.exists()


def test_latest_of_an_empty_or_missing_directory_is_none(tmp_path: Path) -> None:
    assert latest(tmp_path) is None
    assert latest(tmp_path / "missing") is None


def test_latest_refuses_a_file_whose_name_and_round_differ(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    save_round(tmp_path, make_ckpt(round=2))
    save(checkpoint_path(tmp_path, 9), make_ckpt(round=1))
    with caplog.at_level(logging.WARNING, logger="peer.checkpoint"):
        assert latest(tmp_path).state.round == 2
    assert "holds round 1, but its name says 9" in caplog.text


def test_save_round_keeps_the_newest_valid_files(tmp_path: Path) -> None:
    stray = tmp_path / ".round-00000001.ckpt.deadbeef.tmp"
    stray.write_bytes(b"half a checkpoint")
    for round in range(6):
        path = save_round(tmp_path, make_ckpt(round=round), keep=3)
        assert path == checkpoint_path(tmp_path, round) == tmp_path / f"round-{round:08d}.ckpt"
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"round-{r:08d}.ckpt" for r in (3, 4, 5)]

    damaged = checkpoint_path(tmp_path, 6)
    damaged.write_bytes(b"DILOCOCK")
    save_round(tmp_path, make_ckpt(round=7), keep=2)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [f"round-{r:08d}.ckpt" for r in (5, 6, 7)]  # the damaged file is never deleted


def test_save_round_leaves_other_runs_alone(tmp_path: Path) -> None:
    save_round(tmp_path, make_ckpt(round=50, run_id="other-run"))
    for round in range(3):
        save_round(tmp_path, make_ckpt(round=round), keep=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round-00000002.ckpt", "round-00000050.ckpt"]


def test_crash_before_rename_leaves_the_old_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old = make_ckpt(round=12)
    path = save_round(tmp_path, old)
    new = make_ckpt(round=12)
    new.state.theta = new.state.theta + 1
    temp_sizes = []

    def crash(src: str | Path, dst: str | Path) -> None:
        temp_sizes.append((Path(src).name, Path(src).stat().st_size))
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(checkpoint.os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        save(path, new)
    monkeypatch.undo()
    [(temp_name, temp_size)] = temp_sizes
    assert temp_name.startswith(".round-00000012.ckpt.") and temp_name.endswith(".tmp")
    assert temp_size > new.state.theta.numel() * 4
    assert_identical(load(path), old)
    assert_identical(latest(tmp_path), old)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # the temp file was removed


def test_a_temp_file_left_by_a_kill_is_ignored_then_cleaned(tmp_path: Path) -> None:
    old = make_ckpt(round=3)
    save_round(tmp_path, old)
    whole = save(tmp_path / "x", make_ckpt(round=4))
    os.replace(tmp_path / "x", tmp_path / ".round-00000004.ckpt.0badc0de.tmp")
    os.truncate(tmp_path / ".round-00000004.ckpt.0badc0de.tmp", whole // 3)
    assert_identical(latest(tmp_path), old)
    save_round(tmp_path, make_ckpt(round=5))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round-00000003.ckpt", "round-00000005.ckpt"]


SAVE_FOREVER = """
import sys, torch
from peer.checkpoint import Checkpoint, save_round
from peer.outer import GlobalState
for r in range(10**6):
    state = GlobalState(torch.full((1 << 20,), float(r)), torch.zeros(1 << 20), r, r)
    save_round(sys.argv[1], Checkpoint(state, "run", "spec", "p", {}, {}, {}, {}), keep=2)
    print(f"saved {r}", flush=True)
"""


def test_kill_9_while_saving_leaves_a_loadable_checkpoint(tmp_path: Path) -> None:
    proc = start_proc([sys.executable, "-c", SAVE_FOREVER, str(tmp_path / "ckpt")], None, tmp_path / "saver.log")
    try:
        saved = int(wait_for_line(proc, r"^saved (1[0-9])$", timeout_s=40)[1])
    finally:
        proc.kill()
        proc.wait(timeout=10)
    found = latest(tmp_path / "ckpt", run_id="run")
    assert found is not None and found.state.round >= saved
    assert torch.equal(found.state.theta, torch.full((1 << 20,), float(found.state.round)))
    for path in (tmp_path / "ckpt").glob("round-*.ckpt"):
        load(path)


def test_latest_filters_by_run_and_spec(tmp_path: Path) -> None:
    save_round(tmp_path, make_ckpt(round=3, run_id="a", spec_hash="x"))
    save_round(tmp_path, make_ckpt(round=5, run_id="b", spec_hash="x"))
    save_round(tmp_path, make_ckpt(round=4, run_id="a", spec_hash="y"))
    assert latest(tmp_path).state.round == 5
    assert latest(tmp_path, run_id="a").state.round == 4
    assert latest(tmp_path, run_id="a", spec_hash="x").state.round == 3
    assert latest(tmp_path, spec_hash="x").state.round == 5
    assert latest(tmp_path, run_id="b", spec_hash="y") is None
    assert latest(tmp_path, run_id="c") is None
