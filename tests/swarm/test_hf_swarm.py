"""Hugging Face models in a real swarm: 3 peers train a Llama-shaped model (2 layers, hidden 64)
from a local config.json, with a BPE tokenizer trained here, on a JSONL folder; digests agree
every round, the eval loss falls, a 4th peer joins late and matches, and `peer export` of a
checkpoint loads with `from_pretrained` and gives the eval loss the peer reported. Then the same
for a GPT-2-shaped config, whose tied lm_head/wte travel once and come back tied."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.fixtures import train_tokenizer, write_jsonl_corpus
from tests.swarm.harness import Swarm

pytestmark = pytest.mark.timeout(300)
SPEC = ["--codec", "int8", "--target-steps", "60", "--max-round-seconds", "60", "--batch-size", "4",
        "--seq-len", "64", "--eval-batches", "4", "--inner-lr", "3e-3", "--warmup-samples", "40",
        "--total-samples", "100000", "--join-window-s", "4"]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf-files")
    corpus = write_jsonl_corpus(root / "corpus", n_files=3, seed=0)
    texts = [line for f in sorted(corpus.glob("*.jsonl")) for line in f.read_text().splitlines()]
    tokenizer = train_tokenizer(root / "tokenizer", texts, vocab_size=400)
    return {"corpus": corpus, "tokenizer": tokenizer, "root": root}


def model_folder(root: Path, kind: str, vocab: int) -> Path:
    from transformers import GPT2Config, LlamaConfig

    out = root / kind
    if kind == "llama":
        config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                             tie_word_embeddings=False, bos_token_id=None, eos_token_id=None)
    else:
        config = GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=2, n_positions=128,
                            bos_token_id=None, eos_token_id=None)
    config.save_pretrained(out)
    return out


def export_and_eval(swarm: Swarm, ckpt_dir: Path, files: dict[str, Path], reported: dict[int, float]):
    """`peer export` of the newest checkpoint, loaded with from_pretrained; returns the model and
    (its eval loss on the peers' held-out batches, the eval loss the peer reported for that state)."""
    from transformers import AutoModelForCausalLM

    from peer.checkpoint import latest
    from peer.tasks.hf import causal_lm_loss
    from peer.tasks.text import load_tokenizer, text_streams

    out = swarm.root / "export"
    p = subprocess.run([sys.executable, "-m", "peer.cli", "export", "--checkpoint-dir", str(ckpt_dir), "--out",
                        str(out)], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    state_round = latest(ckpt_dir).state.round
    assert f"exported round {state_round}" in p.stdout
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = load_tokenizer(str(out))  # the export carries the tokenizer
    assert tokenizer.hash == load_tokenizer(str(files["tokenizer"])).hash
    _, evals, _ = text_streams(str(files["corpus"]), "", "text", tokenizer, 64, 4, 4, "any")
    with torch.no_grad():
        loss = sum(float(causal_lm_loss(model, x, y)) for x, y in evals) / len(evals)
    return model, loss, reported[state_round]


def eval_by_state(swarm: Swarm, name: str) -> dict[int, float]:
    return {row["state_round"]: row["eval_loss"] for row in swarm.metrics(name)}


def assert_same_states(swarm: Swarm, names: list[str]) -> None:
    digests: dict[int, set[str]] = {}
    for name in names:
        for row in swarm.metrics(name):
            digests.setdefault(row["state_round"], set()).add(row["digest"])
    assert digests and all(len(d) == 1 for d in digests.values()), digests


class TestLlama:
    @pytest.fixture(scope="class")
    def swarm(self, files, tmp_path_factory):
        model = model_folder(files["root"], "llama", 400)
        s = Swarm(tmp_path_factory.mktemp("hf-llama"), [*SPEC, "--run-id", "llama", "--data", str(files["corpus"])])
        try:
            s.start_bootstrap()
            peer = ["--model", str(model), "--tokenizer", str(files["tokenizer"]), "--min-peers", "3"]
            s.start_peer("a", [*peer, "--checkpoint-dir", str(s.root / "ckpt-a"), "--checkpoint-every", "1"])
            s.start_peer("b", peer)
            # a joiner without --model: the config comes with the run spec, the tokenizer from its folder
            s.start_peer("c", ["--tokenizer", str(files["tokenizer"])])
            for name in ("a", "b", "c"):
                s.wait_rounds(name, 3, 240)
            yield s
            s.assert_one_digest_per_round()
        finally:
            s.stop_all()

    def test_three_peers_agree_and_learn(self, swarm):
        rows = swarm.metrics("a")
        assert all(r["group_size"] == 3 and r["outcome"] == "applied" for r in rows[:3]), rows
        assert_same_states(swarm, ["a", "b", "c"])
        evals = [r["eval_loss"] for r in rows[:3]]
        assert evals[2] < evals[0] - 0.05, evals
        assert rows[0]["tokens_per_s"] > 0 and rows[0]["tokens"] == rows[0]["samples"] * 64
        assert "transformers llama" in swarm.log("c")

    def test_late_joiner_matches(self, swarm, files):
        swarm.start_peer("d", ["--model", str(files["root"] / "llama"), "--tokenizer", str(files["tokenizer"])])
        first = swarm.wait_rounds("d", 1, 180)[0]
        seen = {r["state_round"]: r["digest"] for r in swarm.metrics("a") + swarm.metrics("b")}
        swarm.wait_round("a", first["round"] + 1, 120)
        seen |= {r["state_round"]: r["digest"] for r in swarm.metrics("a")}
        assert seen[first["state_round"]] == first["digest"]

    def test_export_loads_with_from_pretrained(self, swarm, files):
        _, loss, reported = export_and_eval(swarm, swarm.root / "ckpt-a", files, eval_by_state(swarm, "a"))
        assert loss == pytest.approx(reported, abs=1e-4)


class TestGPT2:
    @pytest.fixture(scope="class")
    def swarm(self, files, tmp_path_factory):
        model = model_folder(files["root"], "gpt2", 400)
        s = Swarm(tmp_path_factory.mktemp("hf-gpt2"), [*SPEC, "--run-id", "gpt2", "--data", str(files["corpus"])])
        try:
            s.start_bootstrap()
            peer = ["--model", str(model), "--tokenizer", str(files["tokenizer"]), "--min-peers", "2"]
            s.start_peer("a", [*peer, "--checkpoint-dir", str(s.root / "ckpt-a"), "--checkpoint-every", "1"])
            s.start_peer("b", peer)
            for name in ("a", "b"):
                s.wait_rounds(name, 3, 240)
            yield s
            s.assert_one_digest_per_round()
        finally:
            s.stop_all()

    def test_tied_weights_travel_once_and_come_back_tied(self, swarm, files):
        from peer.checkpoint import latest

        assert_same_states(swarm, ["a", "b"])
        evals = [r["eval_loss"] for r in swarm.metrics("a")[:3]]
        assert evals[2] < evals[0] - 0.05, evals
        model, loss, reported = export_and_eval(swarm, swarm.root / "ckpt-a", files, eval_by_state(swarm, "a"))
        assert loss == pytest.approx(reported, abs=1e-4)
        assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
        unique = sum(p.numel() for p in model.parameters())  # parameters() lists the tied tensor once
        assert latest(swarm.root / "ckpt-a").state.theta.numel() == unique
        assert unique < sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False))
