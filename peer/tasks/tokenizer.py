"""Tokenizers: the byte-level default and a local transformers/tokenizers folder, their hash for
the run spec (no transformers import) and their batch encoding. Knows nothing of files or windows."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from peer.tasks.base import TaskError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "vocab.txt", "added_tokens.json")
EOT_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")


class ByteTokenizer:
    """UTF-8 bytes. NUL (id 0) is the end-of-text separator, so a NUL in the text reads as one."""

    vocab_size = 256
    eot_id = 0
    hash = "bytes"
    name = "bytes"

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(t.encode("utf-8", errors="replace")) for t in texts]

    def save(self, out_dir: Path | str) -> bool:
        """Nothing to write: every user knows the byte tokenizer."""
        return False


class HFTokenizer:
    """A local transformers/tokenizers tokenizer folder; its end-of-text is eos_token or a known name."""

    def __init__(self, path: str) -> None:
        self.hash = tokenizer_hash(path)
        self.name = Path(path).resolve().name
        self._tok = _load_hf_tokenizer(Path(path))
        self.vocab_size = len(self._tok)
        self.eot_id = self._find_eot(path)

    def _find_eot(self, path: str) -> int:
        if self._tok.eos_token_id is not None:
            return int(self._tok.eos_token_id)
        vocab = self._tok.get_vocab()
        for name in EOT_NAMES:
            if name in vocab:
                self._tok.eos_token = name  # so that the saved tokenizer names it
                return int(vocab[name])
        raise TaskError(
            f"tokenizer {path} has no end-of-text token: no eos_token, and none of {', '.join(EOT_NAMES)} "
            "in its vocabulary; add one, e.g. tok.add_special_tokens({'eos_token': '<|endoftext|>'}) "
            "then tok.save_pretrained(folder), or set \"eos_token\" in its tokenizer_config.json")

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """The ids without added special tokens; a fast tokenizer's Rust batch call when it has one
        (the same ids as calling the transformers tokenizer, up to twice as fast)."""
        backend = getattr(self._tok, "backend_tokenizer", None)
        if backend is not None:
            encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
            return [e.ids for e in encode(texts, add_special_tokens=False)]
        out = self._tok(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)
        return out["input_ids"]

    def save(self, out_dir: Path | str) -> bool:
        self._tok.save_pretrained(str(out_dir))
        return True


def _load_hf_tokenizer(folder: Path):
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from transformers import AutoTokenizer, PreTrainedTokenizerFast

        if (folder / "tokenizer_config.json").exists():
            try:
                return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
            except Exception:
                if not (folder / "tokenizer.json").exists():
                    raise
        if (folder / "tokenizer.json").exists():
            return PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), **_special_tokens(folder))
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # transformers raises OSError, ValueError, KeyError... for a bad folder
        raise TaskError(f"tokenizer {folder}: cannot be loaded ({type(e).__name__}: {e})") from e


def _special_tokens(folder: Path) -> dict[str, str]:
    path = folder / "special_tokens_map.json"
    if not path.exists():
        return {}
    found = json.loads(path.read_text())
    out = {}
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        value = found.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            out[key] = value
    return out


def tokenizer_hash(path: str) -> str:
    """sha256 over the sorted (name, bytes) of the folder's tokenizer files, 16 hex digits; "" -> "bytes"."""
    if path == "":
        return "bytes"
    folder = Path(path)
    if not folder.is_dir():
        raise TaskError(f"tokenizer {path}: no such folder (expected a folder holding tokenizer.json or "
                        f"another of {', '.join(TOKENIZER_FILES)})")
    present = sorted(name for name in TOKENIZER_FILES if (folder / name).is_file())
    if not present:
        raise TaskError(f"tokenizer folder {path} holds no tokenizer file; expected one of {', '.join(TOKENIZER_FILES)}")
    digest = hashlib.sha256()
    for name in present:
        data = (folder / name).read_bytes()
        digest.update(f"{name}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()[:16]


def load_tokenizer(path: str) -> ByteTokenizer | HFTokenizer:
    """"" -> the byte tokenizer; a folder -> HFTokenizer; TaskError naming the path otherwise."""
    return ByteTokenizer() if path == "" else HFTokenizer(path)


def encode(tokenizer: ByteTokenizer | HFTokenizer, texts: list[str]) -> list[np.ndarray]:
    """Each text's ids as an int32 array."""
    if isinstance(tokenizer, ByteTokenizer):
        return [np.frombuffer(t.encode("utf-8", errors="replace"), np.uint8).astype(np.int32) for t in texts]
    return [np.asarray(ids, dtype=np.int32) for ids in tokenizer.encode_batch(texts)]
