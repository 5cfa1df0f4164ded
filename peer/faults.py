"""Test-only fault plan, keyed by (peer, round, point): the test starts each peer process with
its own plan in DILOCO_FAULTS (JSON), so the peer is the process. Empty in production."""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import struct
import time
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)
POINTS = ("inner_step", "before_average", "overlap_step", "after_round", "checkpoint_write",  # trainer thread
          "pseudo_gradient",   # "scale" only: a Byzantine peer sends factor x its delta (-1: sign-flipped)
          "claim",   # "scale" only: a Byzantine peer claims factor x its weight and samples, and publishes
                     # factor x its steps and samples in its DHT record (forged progress backing the claim)
          "reduced_shard",   # "scale" only: a lying owner serves factor x the shards it reduces as their owner
          "sent_part",       # "corrupt" only: a hostile member's encoded part of a shard, sent to another owner
          "after_join", "after_send", "serving_shard", "served_shard", "leader_commit", "serving_state")  # network loop: kill only


SCALED = ("pseudo_gradient", "claim", "reduced_shard")   # the points whose action is "scale"
# How "corrupt" changes an encoded part after encoding (encoding refuses non-finite values), with the
# header's sha256 recomputed so that the lie is not caught by the hash alone:
CORRUPTIONS = {
    "nan": "a float32 NaN over its first 4 bytes (a value, or a block's scale: every codec's first field)",
    "inf": "a float32 infinity over its first 4 bytes",
    "short": "a shard of the wrong length: its last 4 bytes cut, the header announcing what is sent",
    "oversized": "1 MiB more than the shard's encoded size, announced and sent",
    "stale": "the header names the round before",
    "future": "the header names the round after",
}


@dataclass(frozen=True)
class Fault:
    point: str
    action: str            # "sleep" (seconds), "kill" (SIGKILL to itself), "sigterm" (SIGTERM to itself),
                           # "scale" (the delta sent, at pseudo_gradient only, times factor), "corrupt"
                           # (at sent_part only, as `mode` says)
    round: int | None = None   # None = every round
    seconds: float = 0.0
    skip: int = 0              # let this many hits pass before acting
    factor: float = 1.0        # "scale": e.g. 100 (a huge update) or -1 (sign-flipped)
    mode: str = ""             # "corrupt": one of CORRUPTIONS


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
            if (fault.point not in POINTS or fault.action not in ("sleep", "kill", "sigterm", "scale", "corrupt")
                    or (fault.action == "scale") != (fault.point in SCALED)
                    or (fault.action == "corrupt") != (fault.point == "sent_part" and fault.mode in CORRUPTIONS)):
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

    def sent_part(self, round_: int, header, payload: bytes) -> tuple[object, bytes]:
        """The header and payload of a part this peer sends: as they are, or (a "corrupt" fault: a hostile
        member) changed after encoding as its mode says, the header's sha256 made to match."""
        for f in self._due("sent_part", round_):
            header, payload = _corrupt(f.mode, header, payload)
            log.warning("fault plan: sending %s as part of shard %d of round %d", f.mode, header.shard, round_)
        return header, payload

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


def _corrupt(mode: str, header, payload: bytes) -> tuple[object, bytes]:
    from peer.net.allreduce import payload_digest  # the digest a shard header carries

    header, payload = type(header).FromString(header.SerializeToString()), bytes(payload)
    if mode in ("nan", "inf"):
        payload = struct.pack("<f", math.nan if mode == "nan" else math.inf) + payload[4:]
    elif mode == "short":
        payload = payload[:-4]
    elif mode == "oversized":
        payload = payload + bytes(1 << 20)
    else:
        header.round += -1 if mode == "stale" else 1
    header.num_bytes, header.sha256 = len(payload), payload_digest(payload)
    return header, payload
