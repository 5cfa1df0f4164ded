"""The two built-in tasks, both causal language models over packed token windows:

- `GPTTask`: the byte-level GPT presets (tiny, small, base), on Python's standard library by
  default or on `--data` through the byte tokenizer;
- `HFTask`: any transformers causal LM built from the run's config (`--model PATH`), with the
  run's tokenizer, on `--data`.

Batches are `(x, y)`: int64 [batch, seq_len], y = x shifted by one token.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from peer.config import config_hash
from peer.tasks.base import Batch, BatchStream, Task, TaskError, TaskOptions

log = logging.getLogger(__name__)

HF_DEFAULT_SEQ_LEN = 512
"""Window length of an "hf" model without --seq-len, when its own context is longer."""


class _LMTask(Task):
    """What both share: the tokenizer the run names, its fit to the model, the text streams."""

    def __init__(self, options: TaskOptions, seq_len: int) -> None:
        self.options, self.seq_len = options, seq_len
        if options.tokenizer_hash != "bytes" and not options.tokenizer_path:
            raise TaskError(f"the run uses a tokenizer (hash {options.tokenizer_hash}); pass --tokenizer PATH, "
                            "a folder holding the same tokenizer files as the other peers")
        self.tokenizer = None  # byte-level: peer.tasks.text (and datasets) load only when data is read
        if options.tokenizer_path:
            from peer.tasks.tokenizer import load_tokenizer

            self.tokenizer = load_tokenizer(options.tokenizer_path)
            if self.tokenizer.hash != options.tokenizer_hash:
                raise TaskError(f"--tokenizer {options.tokenizer_path}: hash {self.tokenizer.hash}, the run's is "
                                f"{options.tokenizer_hash}; use the run's tokenizer folder")
        self._stream: BatchStream | None = None
        self._eval: list[Batch] = []
        self._data_text = ""

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size if self.tokenizer is not None else 256

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name if self.tokenizer is not None else "bytes"

    def check_vocab(self, embedding_rows: int) -> None:
        if self.vocab_size > embedding_rows:
            raise TaskError(f"the tokenizer {self.tokenizer_name} has {self.vocab_size} tokens but the "
                            f"model's embedding has {embedding_rows} rows; use a model config whose vocab_size is "
                            f"at least {self.vocab_size}, or a smaller tokenizer")

    def open_data(self) -> None:
        """The streams from --data/--eval-data, read, checked and cut (the trainer asks for them
        before the peer joins, so bad data stops it there); `peer export` never opens them."""
        from peer.tasks.text import text_streams
        from peer.tasks.tokenizer import ByteTokenizer

        o = self.options
        self._stream, self._eval, self._data_text = text_streams(
            o.data, o.eval_data, o.text_field, self.tokenizer or ByteTokenizer(), self.seq_len, o.batch_size, o.eval_batches,
            o.peer_key)

    def train_stream(self) -> BatchStream:
        if self._stream is None:
            self.open_data()
        assert self._stream is not None
        return self._stream

    def eval_batches(self) -> list[Batch]:
        if self._stream is None:
            self.open_data()
        return self._eval


class GPTTask(_LMTask):
    name = "gpt"

    def __init__(self, options: TaskOptions) -> None:
        from peer.tasks.gpt import PRESETS

        if options.model not in PRESETS:
            raise TaskError(f"unknown model preset {options.model!r}; choose one of {sorted(PRESETS)}")
        self.config = PRESETS[options.model]
        seq_len = options.seq_len or self.config.block_size
        if seq_len > self.config.block_size:
            raise TaskError(f"--seq-len {seq_len} exceeds the {options.model} preset's block size "
                            f"{self.config.block_size}")
        super().__init__(options, seq_len)
        self.check_vocab(self.config.vocab_size)

    def open_data(self) -> None:
        if self.options.data:
            super().open_data()
            return
        from peer.tasks.data import BatchStream as ByteStream
        from peer.tasks.data import ByteCorpus, eval_batches, start_position

        if self.options.eval_data:
            raise TaskError("--eval-data needs --data: the built-in corpus has its own held-out part")
        corpus = ByteCorpus.load(None)
        o = self.options
        self._stream = ByteStream(corpus.train, o.batch_size, self.seq_len,
                                  start_position(len(corpus.train), o.peer_key))
        self._eval = eval_batches(corpus.heldout, o.batch_size, self.seq_len, o.eval_batches) if o.eval_batches else []
        self._data_text = (f"{corpus.name} ({len(corpus.train)} bytes, held-out unigram entropy "
                           f"{corpus.unigram_entropy_nats():.3f} nats)")

    def build_model(self) -> torch.nn.Module:
        from peer.tasks.gpt import build_model

        return build_model(self.options.model, self.options.model_seed)

    def loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        x, y = batch
        return model(x, y)[1]

    def describe(self) -> str:
        return f"built-in GPT {self.options.model}, {self.seq_len}-byte windows; data {self._data_text}"

    def export(self, model: torch.nn.Module, out_dir: Path) -> None:
        from peer.tasks.hf import export_gpt

        export_gpt(model, out_dir)


class HFTask(_LMTask):
    """A transformers causal LM of the run's config; the genesis peer starts from the weights in
    its --model folder when there are any (everyone else downloads its state)."""

    name = "hf"

    def __init__(self, options: TaskOptions, weights: bool = True) -> None:
        from peer.tasks.hf import max_positions, read_model_folder

        if not options.model_config:
            raise TaskError("an hf task needs the run's model config (--model PATH)")
        self.weights_dir = ""
        if weights and options.model_path:
            folder = read_model_folder(options.model_path)
            self.weights_dir = folder.path if folder.weights else ""
        limit = max_positions(options.model_config)
        seq_len = options.seq_len or min(limit or HF_DEFAULT_SEQ_LEN, HF_DEFAULT_SEQ_LEN)
        if limit is not None and seq_len > limit:
            raise TaskError(f"--seq-len {seq_len} exceeds the model's {limit} positions")
        super().__init__(options, seq_len)
        vocab = json.loads(options.model_config).get("vocab_size")
        if isinstance(vocab, int):
            self.check_vocab(vocab)

    def open_data(self) -> None:
        if not self.options.data:
            raise TaskError("a transformers model needs --data: a file or folder of .txt, .jsonl/.json or .parquet")
        super().open_data()

    def build_model(self) -> torch.nn.Module:
        from peer.tasks.hf import build_hf_model, embedding_size

        model = build_hf_model(self.options.model_config, self.options.model_seed, self.weights_dir)
        self.check_vocab(embedding_size(model))
        if self.weights_dir:
            log.info("the initial parameters are the weights in %s (used only if this peer starts the run)",
                     self.weights_dir)
        return model

    def loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        from peer.tasks.hf import causal_lm_loss

        x, y = batch
        return causal_lm_loss(model, x, y)

    def describe(self) -> str:
        kind = json.loads(self.options.model_config).get("model_type", "?")
        return (f"transformers {kind} (config {config_hash(self.options.model_config)}), tokenizer {self.tokenizer_name}, {self.seq_len}-token windows; data {self._data_text}")

    def export(self, model: torch.nn.Module, out_dir: Path) -> None:
        from peer.tasks.hf import export_hf

        export_hf(model, out_dir, self.tokenizer)
