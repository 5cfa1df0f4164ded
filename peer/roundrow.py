"""What a round leaves behind: its training stats, the row each round appends to --metrics-file
(and hands to /status and /metrics: see README for the fields), and the test-only dump a test
recomputes the round from (DILOCO_TEST_DUMP_DIR)."""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from peer.net.round import Outcome
from peer.outer import GlobalState


@dataclass
class RoundStats:
    steps: int = 0
    samples: int = 0
    tokens: int = 0
    loss_sum: float = 0.0
    train_s: float = 0.0

    @property
    def loss(self) -> float:
        return self.loss_sum / self.steps if self.steps else float("nan")

    def rates(self) -> tuple[float, float]:
        """Samples and tokens per second of training."""
        if self.train_s <= 0:
            return 0.0, 0.0
        return self.samples / self.train_s, self.tokens / self.train_s


def metrics_row(r: int, peer_id: str, stats: RoundStats, weight: float, o: Outcome, state: GlobalState,
                eval_loss: float, round_s: float, avg_s: float) -> dict:
    """The round's row, but for what only the trainer knows (steps ahead, device memory, phases)."""
    sps, tps = stats.rates()
    roster = o.roster
    return {"round": r, "peer_id": peer_id, "outcome": o.kind, "group_size": len(roster.members) if roster else 0,
            "weight": weight, "total_weight": o.total_weight, "steps": stats.steps, "samples": stats.samples,
            "loss": _num(stats.loss), "eval_loss": _num(eval_loss), "samples_per_s": sps,
            "tokens": stats.tokens, "tokens_per_s": tps,
            "bytes_sent": o.bytes_sent, "bytes_received": o.bytes_received, "round_seconds": round_s,
            "average_seconds": avg_s, "digest": state.digest(), "state_round": state.round,
            "global_samples": state.global_samples, "leader": roster.leader if roster else "",
            "owners": list(roster.owners) if roster else [],
            "shard_bounds": list(roster.shard_bounds) if roster else [],
            "contributors": o.contributors, "dropped": o.dropped, "drop_reasons": dict(o.drop_reasons),
            "time": time.time()}


def dump_round(folder: str, peer_id: str, r: int, state: GlobalState, delta: torch.Tensor, weight: float,
               o: Outcome, new: GlobalState) -> None:
    """Test-only: what a test needs to recompute the round, as {peer_id}.r{r}.npz in `folder`."""
    np.savez(os.path.join(folder, f"{peer_id}.r{r}.npz"), theta=state.theta.numpy(), delta=delta.numpy(),
             weight=np.float64(weight), new_theta=new.theta.numpy(), applied=np.bool_(o.kind == "applied"),
             contributors=np.array(o.contributors, dtype=str))


def _num(x: float) -> float | None:
    return None if math.isnan(x) else x
