"""The task interface: the built-in GPT task and a user's own task (examples/sine_task.py, given
as --task to a real peer process) both satisfy it; the trainer's step (gradient accumulation,
autocast, AdamW groups) is task-agnostic."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from peer.inner import optimizer_groups, pick_precision, train_step
from peer.outer import flatten_params
from peer.tasks import Task, TaskError, TaskOptions, load_user_task, make_task

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


def gpt_task(**kw) -> Task:
    return make_task("", TaskOptions(model="tiny", batch_size=4, eval_batches=2, peer_key="a", **kw))


def test_builtin_task_satisfies_the_interface() -> None:
    task = gpt_task()
    assert isinstance(task, Task)
    model = task.build_model()
    params = task.parameters(model)
    assert len({id(p) for p in params}) == len(params)  # the tied lm_head/wte appears once
    assert model.lm_head.weight is model.wte.weight and any(p is model.wte.weight for p in params)
    again = gpt_task().build_model()
    assert torch.equal(flatten_params(params), flatten_params(again))  # same options, same bytes
    stream = task.train_stream()
    batch = stream.next_batch()
    assert task.samples(batch) == 4 and task.tokens(batch) == 4 * 64
    loss = task.loss(model, batch)
    assert loss.dim() == 0 and torch.isfinite(loss)
    evals = task.eval_batches()
    assert len(evals) == 2 and all(torch.equal(a[0], b[0]) for a, b in zip(evals, gpt_task().eval_batches(), strict=True))
    # the data position resumes exactly
    saved = stream.state_dict()
    ahead = [stream.next_batch()[0] for _ in range(3)]
    resumed = gpt_task().train_stream()
    resumed.load_state_dict(saved)
    assert all(torch.equal(a, resumed.next_batch()[0]) for a in ahead)


def test_builtin_task_refuses_what_it_cannot_train() -> None:
    with pytest.raises(TaskError, match="exceeds the tiny preset's block size 64"):
        gpt_task(seq_len=65)
    with pytest.raises(TaskError, match="unknown model preset 'huge'"):
        make_task("", TaskOptions(model="huge"))
    with pytest.raises(TaskError, match=r"pass --tokenizer PATH"):
        gpt_task(tokenizer_hash="0123456789abcdef")


def test_user_task_loads_and_bad_references_say_why(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.syspath_prepend(str(EXAMPLES))
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "not_a_task.py").write_text("def build(options):\n    return object()\n")
    task = load_user_task("sine_task:build", TaskOptions(batch_size=5, peer_key="p"))
    model = task.build_model()
    x, y = task.train_stream().next_batch()
    assert x.shape == (5, 1) and torch.isfinite(task.loss(model, (x, y)))
    for ref, needle in [("sine_task", "expected module:callable"), ("no_such_module:build", "cannot import"),
                        ("sine_task:nothing", "has no callable 'nothing'"),
                        ("sine_task:SineStream", r"SineStream\(options\) raised TypeError"),
                        ("not_a_task:build", "returned object, expected a peer.tasks.Task subclass")]:
        with pytest.raises(TaskError, match=needle):
            load_user_task(ref, TaskOptions(batch_size=5, peer_key="p"))


def test_adamw_decays_matrices_only() -> None:
    model = gpt_task().build_model()
    decay, no_decay = optimizer_groups(list(model.parameters()), 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert any(p is model.wte.weight for p in decay["params"])  # embeddings decay, as in nanoGPT
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_gradient_accumulation_equals_one_big_batch() -> None:
    task = gpt_task()
    model = task.build_model()
    twin = copy.deepcopy(model)
    batch = task.train_stream().next_batch()
    big = (torch.cat([batch[0], batch[0].flip(0)]), torch.cat([batch[1], batch[1].flip(0)]))
    halves = [(big[0][:4], big[1][:4]), (big[0][4:], big[1][4:])]
    cpu, f32 = torch.device("cpu"), torch.float32
    sgd = lambda m: torch.optim.SGD(m.parameters(), lr=0.1)  # noqa: E731
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    loss_big = train_step(task, model, sgd(model), scaler, [big], cpu, f32)
    loss_acc = train_step(task, twin, sgd(twin), scaler, halves, cpu, f32)
    assert loss_acc == pytest.approx(loss_big, rel=1e-5)
    torch.testing.assert_close(flatten_params(twin), flatten_params(model), rtol=1e-5, atol=1e-6)


def test_bf16_autocast_step_on_cpu_keeps_float32_parameters() -> None:
    assert pick_precision("auto", torch.device("cpu")) == torch.float32
    assert pick_precision("bf16", torch.device("cpu")) == torch.bfloat16
    task = gpt_task()
    model = task.build_model()
    before = flatten_params(model)
    opt = torch.optim.AdamW(optimizer_groups(list(model.parameters()), 0.1), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    loss = train_step(task, model, opt, scaler, [task.train_stream().next_batch()], torch.device("cpu"),
                      torch.bfloat16)
    assert 4 < loss < 7 and all(p.dtype == torch.float32 for p in model.parameters())
    assert not torch.equal(before, flatten_params(model))


@pytest.mark.timeout(180)
def test_user_task_trains_in_a_real_peer_and_exports(tmp_path: Path) -> None:
    """`peer --task sine_task:build` (the README's example) runs, its eval loss falls, `peer
    export` writes the checkpoint's parameters as safetensors, and so does --export-every."""
    env = {**os.environ, "PYTHONPATH": f"{EXAMPLES}{os.pathsep}{ROOT}", "OMP_NUM_THREADS": "1"}
    metrics, ckpts = tmp_path / "m.jsonl", tmp_path / "ckpt"
    cmd = [sys.executable, "-m", "peer.cli", "--task", "sine_task:build", "--target-steps", "60", "--max-rounds", "4",
           "--inner-lr", "3e-3", "--warmup-samples", "10", "--threads", "1", "--host", "127.0.0.1",
           "--dht-host-maddrs", "/ip4/127.0.0.1/tcp/0", "--metrics-file", str(metrics), "--checkpoint-dir", str(ckpts),
           "--checkpoint-every", "1", "--run-id", "sine", "--export-every", "2", "--export-dir", str(tmp_path / "live"),
           "--eval-every", "2"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=150, env=env, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["state_round"] for r in rows] == [1, 2, 3, 4]
    assert [r["eval_loss"] is None for r in rows] == [True, False, True, False], "--eval-every 2: rounds 2 and 4"
    start = float(re.search(r"eval loss at the start: ([0-9.]+)", p.stderr).group(1))
    assert rows[-1]["eval_loss"] < 0.5 * start, [r["eval_loss"] for r in rows]
    out = tmp_path / "export"
    e = subprocess.run([sys.executable, "-m", "peer.cli", "export", "--checkpoint-dir", str(ckpts), "--out", str(out)],
                       capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert e.returncode == 0 and "exported round 4 of run sine" in e.stdout, e.stderr[-2000:]
    from safetensors.torch import load_file

    from peer.checkpoint import latest

    sys.path.insert(0, str(EXAMPLES))
    try:
        task = load_user_task("sine_task:build", TaskOptions())
    finally:
        sys.path.remove(str(EXAMPLES))
    model = task.build_model()
    model.load_state_dict(load_file(out / "model.safetensors"))
    assert torch.equal(flatten_params(model), latest(ckpts).state.theta)
    model.load_state_dict(load_file(tmp_path / "live" / "model.safetensors"))  # --export-every 2: round 4's
    assert torch.equal(flatten_params(model), latest(ckpts).state.theta)


def test_fp16_autocast_with_the_grad_scaler_trains_on_cpu() -> None:
    """The --precision fp16 path (autocast + GradScaler) that a GPU without bf16 takes, run on the
    CPU: the loss falls, master weights stay float32; an inf gradient skips the step."""
    task = gpt_task()
    model = task.build_model()
    opt = torch.optim.AdamW(optimizer_groups(list(model.parameters()), 0.1), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    batch, cpu = task.train_stream().next_batch(), torch.device("cpu")
    losses = [train_step(task, model, opt, scaler, [batch], cpu, torch.float16) for _ in range(5)]
    assert losses[-1] < losses[0] and all(p.dtype == torch.float32 for p in model.parameters())
    before, scale = flatten_params(model), scaler.get_scale()
    with torch.no_grad():
        model.wte.weight[0, 0] = float("inf")  # every gradient becomes non-finite: the step is skipped
    train_step(task, model, opt, scaler, [batch], cpu, torch.float16)
    expected = before.clone()
    expected[0] = float("inf")  # wte comes first in the flat order
    assert scaler.get_scale() < scale and torch.equal(flatten_params(model), expected)
