"""The progress bar on an interactive terminal: one tqdm bar per round (steps in the round out
of this peer's likely share, the running mean loss, samples/s, the round's ETA). Main thread
only: the swarm's side comes from `Node.swarm_left`, which reads values the network loop
replaces and never changes (ARCHITECTURE.md section 2). Without a terminal there is no bar
and the log lines are as they always were."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from tqdm import tqdm

BAR_FORMAT = "{desc} |{bar}| {n_fmt}/{total_fmt} steps{postfix}"


def wants_bar(mode: str, log_level: str, stream: TextIO | None = None) -> bool:
    """--progress: on, off, or auto (a bar when stderr is a terminal, unless the log is DEBUG)."""
    if mode != "auto":
        return mode == "on"
    stream = stream or sys.stderr
    return stream.isatty() and log_level.upper() != "DEBUG"


def estimate(steps: int, steps_per_s: float, left_steps: float, their_steps_per_s: float,
             left_s: float) -> tuple[int | None, float]:
    """(the steps this peer will have done when the round closes, seconds until then), from
    the steps of the swarm's target nobody did yet and everyone's rate, the round's time
    limit (`left_s`) capping both. None while our own step rate is unknown."""
    rate = steps_per_s + their_steps_per_s
    eta_s = max(0.0, left_s)
    if rate > 0:
        eta_s = min(eta_s, max(0.0, left_steps) / rate)
    return (steps + int(steps_per_s * eta_s) if steps_per_s > 0 else None), eta_s


class RoundBar:
    """One round's bar, cleared when the round ends (its log line stays instead)."""

    def __init__(self, round_: int, stream: TextIO | None = None):
        self.started = time.monotonic()
        self.bar = tqdm(total=None, desc=f"round {round_}", file=stream or sys.stderr, leave=False,
                        dynamic_ncols=True, mininterval=0.2, bar_format=BAR_FORMAT)

    def step(self, steps: int, loss: float, samples: int, total: int | None, eta_s: float) -> None:
        """After an inner step: `loss` is the round's running mean, `total` the estimated share."""
        elapsed = time.monotonic() - self.started
        if total is not None:
            self.bar.total = max(total, steps)
        self.bar.set_postfix_str(f"loss {loss:.4f}, {samples / max(elapsed, 1e-9):.0f} samples/s, "
                                 f"ETA {eta_s:.0f} s", refresh=False)
        self.bar.update(steps - self.bar.n)

    def averaging(self) -> None:
        """Training is over: the bar says so while the round averages."""
        self.bar.total = self.bar.n
        self.bar.set_postfix_str(f"{self.bar.postfix or ''}; averaging", refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()
