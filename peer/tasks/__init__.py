"""Tasks: a model and its data behind one interface (`base.Task`), and the inner-LR schedule.

The built-in ones (`lm.GPTTask`: the byte-level GPT presets; `lm.HFTask`: a transformers causal
LM) and a user's own (`--task module:callable`) are all made by `make_task`. Nothing here knows
about peers, rounds or the network.
"""

from peer.tasks.base import Batch, Task, TaskError, TaskOptions, load_user_task, to_device
from peer.tasks.data import BatchStream, ByteCorpus, eval_batches, start_position
from peer.tasks.gpt import GPT, PRESETS, GPTConfig, build_model
from peer.tasks.schedule import inner_lr


def make_task(task: str, options: TaskOptions, weights: bool = True) -> Task:
    """The run's task: `task` is the spec's (module:callable, or "" for the built-in ones chosen by
    `options.model`). weights=False builds an "hf" model from its config alone (`peer export`)."""
    if task:
        return load_user_task(task, options)
    from peer.tasks.lm import GPTTask, HFTask

    return HFTask(options, weights=weights) if options.model == "hf" else GPTTask(options)


__all__ = [
    "GPT",
    "PRESETS",
    "Batch",
    "BatchStream",
    "ByteCorpus",
    "GPTConfig",
    "Task",
    "TaskError",
    "TaskOptions",
    "build_model",
    "eval_batches",
    "inner_lr",
    "load_user_task",
    "make_task",
    "start_position",
    "to_device",
]
