"""A task of your own, whole: a small MLP learns sin(x). Run it from this folder with

    peer --task sine_task:build --max-rounds 5

(or put this folder on PYTHONPATH). Every peer of the run needs this file: the spec names it."""

import hashlib

import torch

from peer.tasks import Task, TaskOptions


class SineStream:
    """Endless batches of (x, sin x); its whole position is the batch counter, so a checkpoint
    resumes it exactly."""

    def __init__(self, seed: int, batch_size: int) -> None:
        self.seed, self.batch_size, self.step = seed, batch_size, 0

    def next_batch(self):
        g = torch.Generator().manual_seed(self.seed + self.step)
        self.step += 1
        x = torch.rand(self.batch_size, 1, generator=g) * 6 - 3
        return x, torch.sin(x)

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step}

    def load_state_dict(self, state) -> None:
        self.step = int(state["step"])


class SineTask(Task):
    name = "sine"

    def __init__(self, options: TaskOptions) -> None:
        self.options = options

    def build_model(self) -> torch.nn.Module:
        with torch.random.fork_rng(devices=[]):  # same seed, same initial bytes; global RNG untouched
            torch.manual_seed(self.options.model_seed)
            return torch.nn.Sequential(torch.nn.Linear(1, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))

    def train_stream(self) -> SineStream:
        # each peer draws its own samples: the seed comes from its identity
        seed = int.from_bytes(hashlib.sha256(self.options.peer_key.encode()).digest()[:6], "big")
        return SineStream(seed, self.options.batch_size)

    def eval_batches(self):
        x = torch.linspace(-3, 3, 256).unsqueeze(1)
        return [(x, torch.sin(x))]

    def loss(self, model: torch.nn.Module, batch) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(model(x), y)


def build(options: TaskOptions) -> Task:
    return SineTask(options)
