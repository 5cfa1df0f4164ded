"""Hugging Face models (peer/tasks/hf.py): model folders, seeded builds, weights, loss, tied weights, export."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import transformers

from peer.outer import assign_flat_, flatten_params  # noqa: E402
from peer.tasks.base import TaskError  # noqa: E402
from peer.tasks.gpt import build_model  # noqa: E402
from peer.tasks.hf import (  # noqa: E402
    build_hf_model,
    canonical_config,
    causal_lm_loss,
    embedding_size,
    export_gpt,
    export_hf,
    load_gpt_export,
    max_positions,
    read_model_folder,
)

pytestmark = pytest.mark.timeout(120)

VOCAB, POSITIONS = 512, 128
DECODER = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=POSITIONS, vocab_size=VOCAB)


def tiny_config(kind: str, **overrides):
    """A 2-layer, width-64 config of a transformers family (special token ids inside the vocabulary)."""
    if kind == "gpt2":
        return transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=POSITIONS,
                                       vocab_size=VOCAB, bos_token_id=0, eos_token_id=0, **overrides)
    classes = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
               "mistral": transformers.MistralConfig}
    return classes[kind](**{**DECODER, **overrides})


def config_folder(path: Path, kind: str, **overrides) -> Path:
    tiny_config(kind, **overrides).save_pretrained(path)
    return path


def config_json(kind: str, **overrides) -> str:
    return canonical_config(tiny_config(kind, **overrides).to_dict())


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def batch(seed: int = 0, batch_size: int = 2, seq_len: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, VOCAB, (batch_size, seq_len + 1), generator=torch.Generator().manual_seed(seed))
    return tokens[:, :-1], tokens[:, 1:]


def unique_numel(model: torch.nn.Module) -> int:
    """Elements of the distinct parameter tensors, counted by storage (not by Parameter identity)."""
    return sum(p.numel() for p in {p.data_ptr(): p for _, p in
                                   model.named_parameters(remove_duplicate=False)}.values())


# --- read_model_folder -----------------------------------------------------------------------------


def test_canonical_hash_ignores_metadata_and_follows_shape(tmp_path: Path) -> None:
    folder = read_model_folder(str(config_folder(tmp_path / "m", "llama")))
    assert folder.path == str((tmp_path / "m").resolve())
    assert folder.weights == [] and not folder.has_tokenizer
    assert "transformers_version" not in folder.config_json and len(folder.config_hash) == 16
    assert json.loads(folder.config_json)["hidden_size"] == 64
    assert folder.config_json == json.dumps(json.loads(folder.config_json), sort_keys=True, separators=(",", ":"))

    edit_config(tmp_path / "m", transformers_version="4.0.0", _name_or_path="x", torch_dtype="bfloat16",
                use_cache=False)
    assert read_model_folder(str(tmp_path / "m")).config_hash == folder.config_hash
    edit_config(tmp_path / "m", architectures=["LlamaForCausalLM"])
    assert "architectures" in read_model_folder(str(tmp_path / "m")).config_json
    edit_config(tmp_path / "m", architectures=None, hidden_size=128)
    assert read_model_folder(str(tmp_path / "m")).config_hash != folder.config_hash

    (tmp_path / "m" / "tokenizer.json").write_text("{}")
    assert read_model_folder(str(tmp_path / "m")).has_tokenizer


def _broken(kind: str, folder: Path) -> None:
    if kind == "missing folder":
        return
    folder.mkdir()
    contents = {"bad json": "{not json", "not an object": "[1, 2]", "no model_type": '{"hidden_size": 64}',
                "pickle weights": '{"model_type": "llama"}'}
    if kind in contents:
        (folder / "config.json").write_text(contents[kind])
    if kind == "pickle weights":
        (folder / "pytorch_model.bin").write_bytes(b"\x80\x04")


@pytest.mark.parametrize("kind, message", [
    ("missing folder", "does not exist"), ("no config.json", "no config.json"),
    ("bad json", "not valid JSON"), ("not an object", "expected an object"),
    ("no model_type", "model_type"), ("pickle weights", "safetensors"),
])
def test_read_model_folder_errors(tmp_path: Path, kind: str, message: str) -> None:
    folder = tmp_path / "model"
    _broken(kind, folder)
    with pytest.raises(TaskError, match=message) as e:
        read_model_folder(str(folder))
    assert str(folder) in str(e.value)


def test_weights_detected(tmp_path: Path) -> None:
    folder = config_folder(tmp_path / "m", "llama")
    (folder / "pytorch_model.bin").write_bytes(b"")  # ignored next to safetensors
    (folder / "model.safetensors").write_bytes(b"")
    assert read_model_folder(str(folder)).weights == ["model.safetensors"]

    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    index = {"metadata": {}, "weight_map": {"a": shards[1], "b": shards[0], "c": shards[1]}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / shards[0]).write_bytes(b"")
    with pytest.raises(TaskError, match=shards[1]):
        read_model_folder(str(folder))
    (folder / shards[1]).write_bytes(b"")
    assert read_model_folder(str(folder)).weights == shards


def test_max_positions() -> None:
    assert max_positions(config_json("llama")) == POSITIONS
    assert max_positions(config_json("gpt2")) == POSITIONS
    assert max_positions('{"model_type": "x", "n_ctx": 64}') == 64
    assert max_positions('{"model_type": "x"}') is None


# --- build_hf_model --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "gpt2", "qwen2", "mistral"])
def test_build_is_seeded_and_leaves_global_rng(kind: str) -> None:
    cfg = config_json(kind)
    rng = torch.get_rng_state()
    a, b, c = build_hf_model(cfg, seed=1), build_hf_model(cfg, seed=1), build_hf_model(cfg, seed=2)
    assert torch.equal(torch.get_rng_state(), rng)
    flat_a = flatten_params(a)
    assert torch.equal(flat_a, flatten_params(b))
    assert not torch.equal(flat_a, flatten_params(c))
    assert a.training and all(p.dtype == torch.float32 for p in a.parameters())
    assert a.config._attn_implementation == "sdpa"
    assert embedding_size(a) == VOCAB


def test_non_causal_configs_are_refused() -> None:
    bert = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=POSITIONS)
    with pytest.raises(TaskError, match="model_type bert: .* sees later tokens"):
        build_hf_model(canonical_config(bert.to_dict()), seed=0)
    bert.is_decoder = True  # BERT's LM head with a causal mask: a decoder after all
    assert embedding_size(build_hf_model(canonical_config(bert.to_dict()), seed=0)) == VOCAB

    t5 = transformers.T5Config(d_model=64, d_ff=128, num_layers=2, num_heads=4, vocab_size=VOCAB)
    with pytest.raises(TaskError, match="model_type t5 has no causal LM head"):
        build_hf_model(canonical_config(t5.to_dict()), seed=0)
    with pytest.raises(TaskError, match="'nonesuch' is unknown"):
        build_hf_model('{"model_type":"nonesuch"}', seed=0)
    bad = json.loads(config_json("llama"))
    bad["hidden_size"] = 66
    with pytest.raises(TaskError, match="model_type llama: the config is invalid: .*attention heads"):
        build_hf_model(json.dumps(bad), seed=0)


def test_build_from_weights(tmp_path: Path) -> None:
    saved = build_hf_model(config_json("llama"), seed=3)
    saved.save_pretrained(tmp_path / "m")
    folder = read_model_folder(str(tmp_path / "m"))
    assert folder.weights == ["model.safetensors"]

    loaded = build_hf_model(folder.config_json, seed=99, weights_dir=folder.path)
    assert loaded.training
    assert torch.equal(flatten_params(loaded), flatten_params(saved))
    # the same model spelled with every default and no architectures still matches the folder
    loaded = build_hf_model(config_json("llama"), seed=99, weights_dir=folder.path)
    assert torch.equal(flatten_params(loaded), flatten_params(saved))

    saved.save_pretrained(tmp_path / "sharded", max_shard_size="200KB")
    sharded = read_model_folder(str(tmp_path / "sharded"))
    assert len(sharded.weights) > 1 and sharded.config_hash == folder.config_hash
    loaded = build_hf_model(folder.config_json, seed=99, weights_dir=sharded.path)
    assert torch.equal(flatten_params(loaded), flatten_params(saved))

    with pytest.raises(TaskError, match="is not the run's model config"):
        build_hf_model(config_json("llama", intermediate_size=256), seed=0, weights_dir=folder.path)
    with pytest.raises(TaskError, match="no safetensors weights"):
        build_hf_model(config_json("llama"), seed=0, weights_dir=str(config_folder(tmp_path / "c", "llama")))


# --- loss, precision -------------------------------------------------------------------------------


def test_causal_lm_loss_is_next_token_cross_entropy_and_trains() -> None:
    model = build_hf_model(config_json("llama"), seed=0)
    x, y = batch()
    loss = causal_lm_loss(model, x, y)
    logits = model(input_ids=x).logits
    assert loss.dim() == 0 and loss.dtype == torch.float32
    assert torch.allclose(loss, F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1)), rtol=0, atol=1e-6)

    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = loss.item()
    for _ in range(5):
        opt.zero_grad()
        causal_lm_loss(model, x, y).backward()
        opt.step()
    assert causal_lm_loss(model, x, y).item() < first - 0.5


def test_bf16_autocast_forward_backward() -> None:
    model = build_hf_model(config_json("llama"), seed=0)
    x, y = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = causal_lm_loss(model, x, y)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())


# --- tied weights and export -----------------------------------------------------------------------


def test_tied_embeddings_travel_once_and_stay_tied(tmp_path: Path) -> None:
    model = build_hf_model(config_json("gpt2"), seed=0)
    wte, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert head.weight is wte.weight
    flat = flatten_params(model)
    assert flat.numel() == unique_numel(model) == sum(p.numel() for p in model.parameters())
    assert sum(p is wte.weight for p in model.parameters()) == 1
    assert sum(p is wte.weight for _, p in model.named_parameters(remove_duplicate=False)) == 2

    new = torch.randn(flat.numel(), generator=torch.Generator().manual_seed(5))
    assign_flat_(model, new)
    assert head.weight is wte.weight and torch.equal(flatten_params(model), new)

    export_hf(model, tmp_path / "out")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight
    assert torch.equal(flatten_params(loaded), new)


def test_untied_embeddings_both_travel() -> None:
    model = build_hf_model(config_json("llama"), seed=0)
    assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight
    assert flatten_params(model).numel() == unique_numel(model)
    assert sum(p.shape == (VOCAB, 64) for p in model.parameters()) == 2


class FakeTokenizer:
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail

    def save(self, out_dir: Path) -> bool:
        if self.fail:
            raise OSError("disk full")
        (Path(out_dir) / "tokenizer.json").write_text("{}")
        return True


def test_export_hf_round_trip_replaces_folder(tmp_path: Path) -> None:
    model = build_hf_model(config_json("llama"), seed=0)
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old export")
    export_hf(model, out, tokenizer=FakeTokenizer())
    assert not (out / "stale.txt").exists() and (out / "tokenizer.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folders left
    assert read_model_folder(str(out)).has_tokenizer

    loaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert torch.equal(flatten_params(loaded), flatten_params(model))
    x, y = batch()
    model.eval()
    with torch.no_grad():
        assert torch.equal(causal_lm_loss(loaded, x, y), causal_lm_loss(model, x, y))

    with pytest.raises(OSError, match="disk full"):
        export_hf(model, out, tokenizer=FakeTokenizer(fail=True))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the old export stays whole
    assert (out / "tokenizer.json").exists()


def test_export_gpt_round_trip(tmp_path: Path) -> None:
    model = build_model("tiny", seed=0)
    export_gpt(model, tmp_path / "gpt")
    config = json.loads((tmp_path / "gpt" / "config.json").read_text())
    assert config["model_type"] == "diloco-gpt" and config["n_embd"] == model.config.n_embd

    rng = torch.get_rng_state()
    loaded = load_gpt_export(tmp_path / "gpt")
    assert torch.equal(torch.get_rng_state(), rng)
    assert loaded.config == model.config and loaded.lm_head.weight is loaded.wte.weight
    assert torch.equal(flatten_params(loaded), flatten_params(model))
    x, y = batch(seq_len=32)
    assert torch.equal(loaded(x % 256, y % 256)[1], model(x % 256, y % 256)[1])

    with pytest.raises(TaskError, match="is not 'diloco-gpt'"):
        load_gpt_export(config_folder(tmp_path / "hf", "llama"))
