"""Test-only fault plan, keyed by (peer, round, point): the test starts each peer process with
its own plan in DILOCO_FAULTS (JSON), so the peer is the process. Empty in production."""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)
POINTS = ("inner_step", "before_average", "overlap_step", "after_round", "checkpoint_write",  # trainer thread
          "pseudo_gradient",   # "scale" only: a Byzantine peer sends factor x its delta (-1: sign-flipped)
          "claim",   # "scale" only: a Byzantine peer claims factor x its weight and samples, and publishes
                     # factor x its steps and samples in its DHT record (forged progress backing the claim)
          "reduced_shard",   # "scale" only: a lying owner serves factor x the shards it reduces as their owner
          "after_join", "after_send", "serving_shard", "served_shard", "leader_commit", "serving_state")  # network loop: kill only


SCALED = ("pseudo_gradient", "claim", "reduced_shard")   # the points whose action is "scale"


@dataclass(frozen=True)
class Fault:
    point: str
    action: str            # "sleep" (seconds), "kill" (SIGKILL to itself), "sigterm" (SIGTERM to itself),
                           # "scale" (the delta sent, at pseudo_gradient only, times factor)
    round: int | None = None   # None = every round
    seconds: float = 0.0
    skip: int = 0              # let this many hits pass before acting
    factor: float = 1.0        # "scale": e.g. 100 (a huge update) or -1 (sign-flipped)


class FaultPlan:
    def __init__(self, faults: list[Fault]):
        self.faults = faults
        self.hits = [0] * len(faults)

    @classmethod
    def from_env(cls) -> FaultPlan:
        raw = os.environ.get("DILOCO_FAULTS", "")
        if not raw:
            return cls([])
        faults = []
        for item in json.loads(raw):
            fault = Fault(**item)
            if (fault.point not in POINTS or fault.action not in ("sleep", "kill", "sigterm", "scale")
                    or (fault.action == "scale") != (fault.point in SCALED)):
                raise ValueError(f"DILOCO_FAULTS: bad fault {item}")
            faults.append(fault)
        log.warning("test fault plan active: %s", faults)
        return cls(faults)

    def _due(self, point: str, round_: int) -> list[Fault]:
        due = []
        for i, f in enumerate(self.faults):
            if f.point == point and (f.round is None or f.round == round_):
                self.hits[i] += 1
                if self.hits[i] > f.skip:
                    due.append(f)
        return due

    def sent_delta(self, round_: int, delta: torch.Tensor) -> torch.Tensor:
        """The pseudo-gradient this peer sends: `delta` itself, or (a "scale" fault: a peer that
        lies) a scaled copy; the peer keeps using its true delta for carry and adoption."""
        for f in self._due("pseudo_gradient", round_):
            log.warning("fault plan: sending %g x the pseudo-gradient of round %d", f.factor, round_)
            delta = delta * f.factor
        return delta

    def claim_factor(self, round_: int) -> float:
        """What this peer multiplies its claims and its published progress by (1: it does not lie)."""
        return self._factor("claim", round_)

    def owner_factor(self, round_: int) -> float:
        """What this peer multiplies the shards it reduces as their owner by (1: it does not lie)."""
        return self._factor("reduced_shard", round_)

    def _factor(self, point: str, round_: int) -> float:
        factor = 1.0
        for f in self.faults:
            if f.point == point and (f.round is None or f.round == round_):
                factor *= f.factor
        return factor

    def hit(self, point: str, round_: int) -> None:
        for i, f in enumerate(self.faults):
            if f.point == point and (f.round is None or f.round == round_):
                self.hits[i] += 1
                if self.hits[i] <= f.skip:
                    continue
                if f.action == "sleep":
                    time.sleep(f.seconds)
                else:
                    log.warning("fault plan: %s to myself at %s of round %d", f.action, point, round_)
                    os.kill(os.getpid(), signal.SIGKILL if f.action == "kill" else signal.SIGTERM)
