"""The built-in training task: a byte-level GPT, its corpus and batches, and the inner-LR schedule.

Pure torch and numpy; nothing here knows about peers, rounds or the network.
"""

from peer.tasks.data import BatchStream, ByteCorpus, eval_batches, start_position
from peer.tasks.gpt import GPT, PRESETS, GPTConfig, build_model
from peer.tasks.schedule import inner_lr

__all__ = [
    "GPT",
    "PRESETS",
    "BatchStream",
    "ByteCorpus",
    "GPTConfig",
    "build_model",
    "eval_batches",
    "inner_lr",
    "start_position",
]
