"""What the Hugging Face swarm tests share: a JSONL corpus and a BPE tokenizer made in the test,
model folders of tiny configs, `peer export` of a checkpoint evaluated with from_pretrained."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import torch

from tests.fixtures import train_tokenizer, write_jsonl_corpus
from tests.procs import wait_for_line
from tests.swarm.harness import Swarm

SPEC = ["--codec", "int8", "--target-steps", "60", "--max-round-seconds", "60", "--batch-size", "4",
        "--seq-len", "64", "--eval-batches", "4", "--inner-lr", "3e-3", "--warmup-samples", "40",
        "--total-samples", "100000", "--join-window-s", "4"]


def make_files(root: Path) -> dict[str, Path]:
    corpus = write_jsonl_corpus(root / "corpus", n_files=3, seed=0)
    texts = [line for f in sorted(corpus.glob("*.jsonl")) for line in f.read_text().splitlines()]
    tokenizer = train_tokenizer(root / "tokenizer", texts, vocab_size=400)
    return {"corpus": corpus, "tokenizer": tokenizer, "root": root}


def start_hf_run(root: Path, files: dict[str, Path], kind: str, min_peers: int) -> tuple[Swarm, list[str]]:
    """A bootstrap node and peer "a", which starts run `kind` from model_folder(kind) and keeps a
    checkpoint every round; returns the swarm and the flags for more peers of the same kind."""
    s = Swarm(root, [*SPEC, "--run-id", kind, "--data", str(files["corpus"])])
    try:
        s.start_bootstrap()
        peer = ["--model", str(model_folder(files["root"], kind, 400)), "--tokenizer", str(files["tokenizer"]),
                "--min-peers", str(min_peers)]
        a = s.start_peer("a", [*peer, "--checkpoint-dir", str(s.root / "ckpt-a"), "--checkpoint-every", "1"])
        wait_for_line(a, rf"started run {kind}", 90)  # the run's spec is a's, whoever else is quicker
        return s, peer
    except BaseException:
        s.stop_all()
        raise


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


def export_and_eval(swarm: Swarm, ckpt_dir: Path, files: dict[str, Path], name: str):
    """`peer export` of the newest checkpoint, loaded with from_pretrained; returns the model and
    (its eval loss on the peers' held-out batches, the eval loss the peer reported for that state)."""
    from transformers import AutoModelForCausalLM

    from peer.tasks.hf import causal_lm_loss
    from peer.tasks.text import load_tokenizer, text_streams

    out = swarm.root / "export"
    p = subprocess.run([sys.executable, "-m", "peer.cli", "export", "--checkpoint-dir", str(ckpt_dir), "--out",
                        str(out)], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    state_round = int(re.search(r"exported round (\d+) of run", p.stdout).group(1))  # the swarm trains on
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = load_tokenizer(str(files["tokenizer"]))
    exported = load_tokenizer(str(out))  # the export carries a tokenizer that encodes the same
    sample = [line for line in next(files["corpus"].glob("*.jsonl")).read_text().splitlines()[:20]]
    assert exported.encode_batch(sample) == tokenizer.encode_batch(sample)
    assert exported.eot_id == tokenizer.eot_id and exported.vocab_size == tokenizer.vocab_size
    _, evals, _ = text_streams(str(files["corpus"]), "", "text", tokenizer, 64, 4, 4, "any")
    with torch.no_grad():
        loss = sum(float(causal_lm_loss(model, x, y)) for x, y in evals) / len(evals)
    return model, loss, eval_by_state(swarm, name)[state_round]  # its row is written before its checkpoint


def eval_by_state(swarm: Swarm, name: str) -> dict[int, float]:
    return {row["state_round"]: row["eval_loss"] for row in swarm.metrics(name)}


def assert_same_states(swarm: Swarm, names: list[str]) -> None:
    digests: dict[int, set[str]] = {}
    for name in names:
        for row in swarm.metrics(name):
            digests.setdefault(row["state_round"], set()).add(row["digest"])
    assert digests and all(len(d) == 1 for d in digests.values()), digests


