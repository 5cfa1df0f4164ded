"""The task interface: everything the trainer needs of a model and its data, and nothing more.

A task builds its model, yields training batches from a resumable stream, computes the loss of
a batch, gives the fixed held-out batches, names the parameters that travel, and writes the
model out in a form its users load. The trainer owns the device, the precision, the optimizer,
gradient accumulation and the rounds; a task never sees a peer, a round or the network.

A user's own task is `--task my_module:build`: `build(TaskOptions) -> Task`.
"""

from __future__ import annotations

import abc
import importlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

Batch = Any
"""A tensor, or a tuple, list or dict of tensors, on the CPU; dimension 0 counts samples."""


class TaskError(ValueError):
    """A task that cannot be built from what the user gave (a model folder, a tokenizer, data):
    the peer stops before it joins, with exit status 2 and this message."""


@dataclass(frozen=True)
class TaskOptions:
    """What a task is built from: the run spec's task fields (the same on every peer) and this
    peer's own settings (paths, batch size)."""

    # run spec
    model: str = "small"
    """A built-in preset (tiny, small, base) or "hf" (a transformers causal LM)."""
    model_config: str = ""
    """For "hf": the canonical JSON of the transformers config every peer builds."""
    model_seed: int = 0
    """Seed of the initial parameters (the genesis peer's are downloaded by every other peer)."""
    seq_len: int = 0
    """Tokens per training window; 0 = the model's own (a preset's block size, or
    min(max_position_embeddings, 512) for "hf")."""
    tokenizer_hash: str = "bytes"
    """"bytes" (the byte-level default) or the hash of the tokenizer every peer must use."""
    # this peer
    model_path: str = ""
    """For "hf": a local folder with config.json (and weights, for the genesis peer to start from)."""
    tokenizer_path: str = ""
    """A local tokenizers/transformers tokenizer folder; "" = byte-level (or the model folder's)."""
    data: str = ""
    """A file or folder of .txt, .jsonl/.json or .parquet; "" = the built-in corpus."""
    eval_data: str = ""
    """Held-out data of the same kinds; "" = a fixed held-out slice cut from `data`."""
    text_field: str = "text"
    """The field that holds the text in .jsonl/.json/.parquet rows."""
    batch_size: int = 8
    eval_batches: int = 8
    peer_key: str = ""
    """This peer's identity: which part of the data it reads first (deterministic)."""


class BatchStream(Protocol):
    """Training batches without end; its whole position is `state_dict()` (str -> int), so a
    stream restored with `load_state_dict` yields exactly the batches the saved one would have."""

    def next_batch(self) -> Batch: ...

    def state_dict(self) -> dict[str, int]: ...

    def load_state_dict(self, state: Mapping[str, int]) -> None: ...


class Task(abc.ABC):
    """One model and its data. Subclasses implement the abstract methods; the rest have defaults
    that fit a causal language model whose batches are (inputs, targets) pairs."""

    name: str = "task"

    @abc.abstractmethod
    def build_model(self) -> torch.nn.Module:
        """The model on the CPU in float32 (the trainer moves it to its device). The same task
        options give the same bytes on machines of one kind; other peers download the genesis
        peer's parameters anyway."""

    @abc.abstractmethod
    def train_stream(self) -> BatchStream:
        """This peer's training batches (its part of the data, from `TaskOptions.peer_key`)."""

    @abc.abstractmethod
    def eval_batches(self) -> list[Batch]:
        """The fixed held-out batches, the same on every peer with the same data; [] = none."""

    @abc.abstractmethod
    def loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """Mean loss of a batch already on the model's device, as a 0-d tensor."""

    def parameters(self, model: torch.nn.Module) -> list[torch.nn.Parameter]:
        """The parameters that travel, in a fixed order; a tied parameter appears once."""
        return list(model.parameters())  # deduplicates by identity: GPT-2's lm_head and wte are one

    def samples(self, batch: Batch) -> int:
        """Samples in a batch (its first tensor's dimension 0)."""
        return int(_first_tensor(batch).shape[0])

    def tokens(self, batch: Batch) -> int:
        """Tokens trained on in a batch (its first tensor's elements), for tokens/s."""
        return int(_first_tensor(batch).numel())

    def describe(self) -> str:
        """One line for the log: the model, its size, the data."""
        return self.name

    def export(self, model: torch.nn.Module, out_dir: Path) -> None:
        """Write the model (holding the global state's parameters) where its users load it:
        safetensors of its state dict, by default."""
        from safetensors.torch import save_model

        out_dir.mkdir(parents=True, exist_ok=True)
        save_model(model, str(out_dir / "model.safetensors"))


def to_device(batch: Batch, device: torch.device) -> Batch:
    """The batch with every tensor on `device` (non-blocking from pinned memory)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, Sequence) and not isinstance(batch, str):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def _first_tensor(batch: Batch) -> torch.Tensor:
    if isinstance(batch, torch.Tensor):
        return batch
    values = batch.values() if isinstance(batch, Mapping) else batch
    for v in values:
        if isinstance(v, torch.Tensor):
            return v
    raise TypeError(f"a batch must hold a tensor, got {type(batch).__name__}")


def load_user_task(ref: str, options: TaskOptions) -> Task:
    """`module:callable` (the module importable from the working directory or PYTHONPATH)
    called with the options; TaskError saying what is wrong otherwise."""
    module_name, _, attr = ref.partition(":")
    if not module_name or not attr:
        raise TaskError(f"--task {ref!r}: expected module:callable, e.g. my_task:build")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise TaskError(f"--task {ref!r}: cannot import {module_name!r}: {e}; run the peer from the "
                        "folder that holds it or add that folder to PYTHONPATH") from e
    build = getattr(module, attr, None)
    if not callable(build):
        raise TaskError(f"--task {ref!r}: {module_name} has no callable {attr!r}")
    try:
        task = build(options)
    except TaskError:
        raise
    except Exception as e:
        raise TaskError(f"--task {ref!r}: {attr}(options) raised {type(e).__name__}: {e}") from e
    if not isinstance(task, Task):
        raise TaskError(f"--task {ref!r}: {attr}() returned {type(task).__name__}, expected a "
                        "peer.tasks.Task subclass")
    return task
