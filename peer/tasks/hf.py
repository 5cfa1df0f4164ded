"""Hugging Face causal LMs as the swarm's model: read a model folder, build the same model on every
peer, its next-token loss, and export (transformers models and the built-in GPT) as folders users load.

No data or tokenizer code (peer/tasks/text.py), no peers, no network. transformers is imported only
when a model is built or saved: `read_model_folder` and `max_positions` run while the CLI checks flags.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from peer.config import config_hash  # the run spec checks model_hash with this same function
from peer.tasks.base import TaskError

if TYPE_CHECKING:
    import torch

    from peer.tasks.gpt import GPT

IGNORED_CONFIG_KEYS = frozenset({
    "_name_or_path", "_commit_hash", "transformers_version", "torch_dtype", "dtype",
    "attn_implementation", "_attn_implementation", "_attn_implementation_autoset",
    "use_cache", "output_attentions", "output_hidden_states", "return_dict",
})
"""config.json keys that change neither the model's shape nor its math: left out of the canonical
JSON, so folders saved by other transformers versions or in other dtypes hash the same. The peer
sets dtype (float32), attention ("sdpa" or "eager") and caching (off) itself."""

GPT_EXPORT_TYPE = "diloco-gpt"
"""config.json's model_type in an export of the built-in GPT (not a transformers model)."""

_CAUSAL_RTOL = 1e-4
"""Relative change of earlier logits above which a model is taken to look ahead (see _check_causal)."""


@dataclass(frozen=True)
class ModelFolder:
    """What a local transformers model folder holds, read without importing transformers."""

    path: str
    """Absolute path of the folder."""
    config_json: str
    """config.json as canonical JSON: sorted keys, compact, without IGNORED_CONFIG_KEYS."""
    config_hash: str
    """First 16 hex digits of the sha256 of config_json: the model every peer must build."""
    weights: list[str]
    """The safetensors files present, relative to path (model.safetensors, or the shards that
    model.safetensors.index.json lists); [] = no weights (the model starts from its seed)."""
    has_tokenizer: bool
    """The folder holds tokenizer.json or tokenizer_config.json."""


class SavesTokenizer(Protocol):
    def save(self, out_dir: Path) -> bool: ...


def canonical_config(config: dict[str, Any]) -> str:
    """The canonical JSON text of a config dict (see ModelFolder.config_json)."""
    return json.dumps(_drop_ignored(config), sort_keys=True, separators=(",", ":"))


def read_model_folder(path: str) -> ModelFolder:
    """The folder's canonical config, its safetensors weights and whether it has a tokenizer;
    TaskError naming the folder when it cannot be a model folder a peer loads."""
    folder = Path(path).expanduser().resolve()
    if not folder.is_dir():
        raise TaskError(f"model folder {folder}: does not exist or is not a folder")
    config = _read_config(folder)
    config_json = canonical_config(config)
    return ModelFolder(
        path=str(folder),
        config_json=config_json,
        config_hash=config_hash(config_json),
        weights=_safetensors_files(folder),
        has_tokenizer=(folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file(),
    )


def max_positions(config_json: str) -> int | None:
    """The longest sequence the config declares (max_position_embeddings, n_positions or n_ctx,
    at the top or in its text_config), or None."""
    config = json.loads(config_json)
    for scope in (config, config.get("text_config") or {}):
        for key in ("max_position_embeddings", "n_positions", "n_ctx"):
            value = scope.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def build_hf_model(config_json: str, seed: int, weights_dir: str = "") -> torch.nn.Module:
    """The causal LM of a canonical config, float32 on the CPU, in train mode.

    Without weights_dir its parameters come from `seed` (the same bytes for the same seed on one
    machine; the global RNG is left as it was). With weights_dir they are that folder's safetensors,
    whose config.json must describe the same model. TaskError when transformers has no causal LM
    for the config, or its model looks ahead (an encoder such as BERT without is_decoder).
    """
    import torch

    transformers = _transformers()
    config = _config_from_json(config_json)
    model_class = _causal_lm_class(config)
    attn = "sdpa" if getattr(model_class, "_supports_sdpa", False) else "eager"
    with torch.random.fork_rng(devices=[]):  # init (and any weight missing from a folder) draws from it
        torch.default_generator.manual_seed(seed)  # the CPU's only: torch.manual_seed would reseed CUDA too
        if weights_dir:
            model = _load_weights(weights_dir, config_json, attn)
        else:
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32,
                                                                  attn_implementation=attn)
        _check_causal(model, config.model_type)
    return model.train()


def embedding_size(model: torch.nn.Module) -> int:
    """Rows of the input embedding: the token ids the model accepts."""
    return int(model.get_input_embeddings().num_embeddings)


def causal_lm_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (float32, 0-d) of a transformers causal LM; x, y: int64 [B, T],
    y already shifted by one (so no labels= argument: transformers would shift again)."""
    import torch.nn.functional as F

    logits = model(input_ids=x, use_cache=False, return_dict=True).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1))


def export_hf(model: torch.nn.Module, out_dir: Path, tokenizer: SavesTokenizer | None = None) -> None:
    """save_pretrained (safetensors, a tied weight stored once) and the tokenizer, if any, into a
    fresh folder that then replaces out_dir: `from_pretrained(out_dir)` gives these parameters bitwise."""
    _transformers()

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)  # transformers 5 writes safetensors only (no safe_serialization flag)
        if tokenizer is not None:
            tokenizer.save(tmp)

    _write_folder(Path(out_dir), write)


def export_gpt(model: GPT, out_dir: Path) -> None:
    """The built-in GPT as model.safetensors (the tied wte/lm_head stored once) and config.json
    {"model_type": "diloco-gpt", GPTConfig fields}; `load_gpt_export` reads it back."""
    from safetensors.torch import save_model

    def write(tmp: Path) -> None:
        save_model(model, str(tmp / "model.safetensors"))
        config = {"model_type": GPT_EXPORT_TYPE, **asdict(model.config)}
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    _write_folder(Path(out_dir), write)


def load_gpt_export(path: Path) -> GPT:
    """The GPT in a folder written by export_gpt (float32, CPU); TaskError for anything else."""
    import torch
    from safetensors.torch import load_model

    from peer.tasks.gpt import GPT, GPTConfig

    folder = Path(path)
    config = _read_config(folder)
    if config["model_type"] != GPT_EXPORT_TYPE:
        raise TaskError(f"model folder {folder}: model_type {config['model_type']!r} is not "
                        f"{GPT_EXPORT_TYPE!r}; load transformers models with from_pretrained")
    fields = {k: v for k, v in config.items() if k != "model_type"}
    try:
        gpt_config = GPTConfig(**fields)
    except (TypeError, ValueError) as e:
        raise TaskError(f"model folder {folder}: config.json is not a GPTConfig: {e}") from e
    with torch.random.fork_rng(devices=[]):  # the init is overwritten; keep the caller's RNG
        model = GPT(gpt_config)
    load_model(model, str(folder / "model.safetensors"))
    return model


# --- model folders (json only) -------------------------------------------------------------------


def _read_config(folder: Path) -> dict[str, Any]:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise TaskError(f"model folder {folder}: no config.json")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TaskError(f"model folder {folder}: config.json is not valid JSON: {e}") from e
    if not isinstance(config, dict):
        raise TaskError(f"model folder {folder}: config.json holds a {type(config).__name__}, "
                        "expected an object")
    if not isinstance(config.get("model_type"), str) or not config["model_type"]:
        raise TaskError(f"model folder {folder}: config.json has no \"model_type\" (e.g. \"llama\")")
    return config


def _safetensors_files(folder: Path) -> list[str]:
    index_path = folder / "model.safetensors.index.json"
    if index_path.is_file():
        return _index_shards(folder, index_path)
    if (folder / "model.safetensors").is_file():
        return ["model.safetensors"]
    pickles = sorted(p.name for p in folder.glob("pytorch_model*.bin"))
    if pickles:
        raise TaskError(f"model folder {folder}: only pickle weights ({', '.join(pickles)}), which a "
                        "peer never unpickles; convert them to safetensors, e.g. load the model once "
                        "and call save_pretrained(folder, safe_serialization=True)")
    return []


def _index_shards(folder: Path, index_path: Path) -> list[str]:
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise TaskError(f"model folder {folder}: {index_path.name} has no valid weight_map: {e}") from e
    missing = [s for s in shards if not (folder / s).is_file()]
    if missing:
        raise TaskError(f"model folder {folder}: {index_path.name} lists {', '.join(missing)}, "
                        "which the folder lacks")
    return shards


def _drop_ignored(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_ignored(v) for k, v in value.items() if k not in IGNORED_CONFIG_KEYS}
    return value


# --- transformers --------------------------------------------------------------------------------


def _transformers() -> Any:
    """transformers, offline, its warnings routed to our log format and its progress bars off."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()
    hf_logging.disable_progress_bar()
    return transformers


def _config_from_json(config_json: str) -> Any:
    from huggingface_hub.errors import StrictDataclassError
    from transformers import CONFIG_MAPPING

    config = json.loads(config_json)
    model_type = config.get("model_type")
    if model_type not in CONFIG_MAPPING:
        import transformers

        raise TaskError(f"model_type {model_type!r} is unknown to transformers {transformers.__version__} "
                        "(a peer never runs a model's own code: trust_remote_code stays off)")
    try:
        return CONFIG_MAPPING[model_type].from_dict(config)
    except (ValueError, TypeError, StrictDataclassError) as e:  # strict validation: not ValueErrors
        cause = e.__cause__ if isinstance(e, StrictDataclassError) and e.__cause__ else e  # one line
        raise TaskError(f"model_type {model_type}: the config is invalid: {cause}") from e


def _causal_lm_class(config: Any) -> type:
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        raise TaskError(f"model_type {config.model_type} has no causal LM head in transformers") from None


def _load_weights(weights_dir: str, config_json: str, attn: str) -> torch.nn.Module:
    import torch
    from transformers import AutoModelForCausalLM

    folder = read_model_folder(weights_dir)
    if not folder.weights:
        raise TaskError(f"model folder {folder.path}: no safetensors weights to start from")
    if not _same_model(folder.config_json, config_json):
        raise TaskError(f"model folder {folder.path}: its config.json (hash {folder.config_hash}) is not "
                        f"the run's model config (hash {config_hash(config_json)})")
    model, info = AutoModelForCausalLM.from_pretrained(
        folder.path, dtype=torch.float32, local_files_only=True, use_safetensors=True,
        attn_implementation=attn, output_loading_info=True)
    problems = {k: sorted(info[k]) for k in ("missing_keys", "mismatched_keys") if info.get(k)}
    if problems:
        raise TaskError(f"model folder {folder.path}: its weights do not fit the model: {problems}")
    return model


def _same_model(a_json: str, b_json: str) -> bool:
    """The two canonical configs build the same model: the same text, or the same config once the
    config class has filled in its defaults (architectures aside: AutoModelForCausalLM ignores it)."""
    if a_json == b_json:
        return True

    def normal(config_json: str) -> str:
        full = _config_from_json(config_json).to_dict()
        full.pop("architectures", None)
        return canonical_config(full)

    return normal(a_json) == normal(b_json)


def _check_causal(model: torch.nn.Module, model_type: str) -> None:
    """TaskError unless the logits of earlier positions ignore later tokens (an encoder's LM head,
    e.g. BERT's without is_decoder, sees the whole sequence and would learn to copy the target)."""
    import torch

    vocab = embedding_size(model)
    x = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 5]]) % vocab
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(input_ids=x, use_cache=False, return_dict=True).logits.float()
    except Exception as e:  # any failure here would be the first training step's
        raise TaskError(f"model_type {model_type}: a forward pass on input_ids fails: {e}") from e
    finally:
        model.train(was_training)
    change = (logits[0, :3] - logits[1, :3]).abs().max().item()
    if change > _CAUSAL_RTOL * max(1.0, logits.abs().max().item()):
        raise TaskError(f"model_type {model_type}: its causal LM head ({type(model).__name__}) sees later "
                        "tokens (changing the last token changes earlier logits); for an encoder such "
                        "as BERT set \"is_decoder\": true in config.json, or use a decoder model")


def _write_folder(out_dir: Path, write: Callable[[Path], None]) -> None:
    """write() into a new sibling folder, then put it in out_dir's place: a reader sees the old
    folder, no folder for an instant, or the new one; never half a folder."""
    if out_dir.exists() and not out_dir.is_dir():
        raise TaskError(f"export folder {out_dir}: exists and is not a folder")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp's 0700 would hide the export from other users
        write(tmp)
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f"{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old)  # onto the empty folder mkdtemp made
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
