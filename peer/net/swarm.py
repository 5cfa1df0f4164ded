"""The run's records in the DHT: spec proposals, peer progress/membership and digests.
Runs on the network loop; every DHT call is a `return_future=True` call under a deadline."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import hivemind
from hivemind.utils import get_dht_time

log = logging.getLogger(__name__)

RECORD_TTL_S = 30.0      # DHT expiry; the thread doing the work refreshes long before
FRESH_S = 6.0            # a progress record older than this is a peer we no longer count on
# What a peer is doing, in its record: getting a state (not ready yet: counts for nothing),
# waiting for a round to start, training, averaging (in a round's group).
SYNC, WAIT, TRAIN, AVERAGE = "sync", "wait", "train", "average"
PHASES = (SYNC, WAIT, TRAIN, AVERAGE)


async def _await(fut: Any) -> Any:
    return await fut


async def dht_call(fut: Any, timeout_s: float, what: str) -> Any:
    """Awaits an MPFuture made on this loop; raises TimeoutError naming `what`."""
    try:
        return await asyncio.wait_for(_await(fut), timeout_s)
    except asyncio.TimeoutError:
        fut.cancel()
        raise TimeoutError(f"DHT {what} did not answer within {timeout_s:.1f} s") from None


async def store(dht: hivemind.DHT, key: str, subkey: str, value: Any, timeout_s: float) -> bool:
    fut = dht.store(key, value, get_dht_time() + RECORD_TTL_S, subkey=subkey, return_future=True)
    return bool(await dht_call(fut, timeout_s, f"store {key}"))


async def read(dht: hivemind.DHT, key: str, timeout_s: float) -> dict[str, Any]:
    """All subkeys of `key` with their values (an empty dict when there is none)."""
    found = await dht_call(dht.get(key, latest=True, return_future=True), timeout_s, f"get {key}")
    if found is None or not isinstance(found.value, dict):
        return {}
    return {sub: item.value for sub, item in found.value.items() if isinstance(sub, str)}


@dataclass(frozen=True)
class PeerRecord:
    """One peer's progress and membership record, as published every half second."""

    peer_id: str
    addr: str            # host:port of its gRPC server ("" in client mode)
    round: int           # the round it trains for (it holds theta_round)
    steps: int           # inner steps done in this round
    samples: int
    rate: float          # inner steps per second while training, 0 when not training
    training: bool
    client: bool
    state_round: int     # round of the state it can serve; -1 = none
    spec: str            # spec hash
    t: float             # DHT time of publication
    phase: str = ""      # one of PHASES: what the peer is doing now

    def ready(self) -> bool:
        """Holds a state of the run and is not catching up: counts for --min-peers and rounds."""
        return self.state_round >= 0 and self.phase != SYNC

    def age_s(self) -> float:
        return get_dht_time() - self.t

    def fresh(self) -> bool:
        return self.age_s() < FRESH_S

    def steps_now(self) -> float:
        """Steps extrapolated to now from the published rate."""
        return self.steps + self.rate * max(0.0, min(self.age_s(), FRESH_S))

    @classmethod
    def parse(cls, peer_id: str, v: Any) -> PeerRecord | None:
        try:
            rec = cls(peer_id=peer_id, addr=str(v["addr"]), round=int(v["round"]), steps=int(v["steps"]),
                      samples=int(v["samples"]), rate=float(v["rate"]), training=bool(v["training"]),
                      client=bool(v["client"]), state_round=int(v["state_round"]), spec=str(v["spec"]),
                      t=float(v["t"]), phase=str(v["phase"]))
        except (KeyError, TypeError, ValueError):
            log.debug("ignoring malformed progress record of %s: %r", peer_id, v)
            return None
        if rec.rate < 0 or rec.steps < 0 or rec.rate > 1e6 or rec.phase not in PHASES:
            return None
        return rec

    def to_value(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "peer_id"}


def peers_key(run_id: str) -> str:
    return f"{run_id}.peers"


def spec_key(run_id: str) -> str:
    return f"{run_id}.spec"


def digest_key(run_id: str, round_: int) -> str:
    return f"{run_id}.digest.{round_}"


async def read_peers(dht: hivemind.DHT, run_id: str, timeout_s: float) -> dict[str, PeerRecord]:
    out = {}
    for pid, v in (await read(dht, peers_key(run_id), timeout_s)).items():
        rec = PeerRecord.parse(pid, v)
        if rec is not None:
            out[pid] = rec
    return out


def majority_digest(digests: dict[str, str]) -> tuple[str | None, int]:
    """The digest most peers published and how many did (ties: the smaller digest)."""
    counts: dict[str, int] = {}
    for d in digests.values():
        counts[d] = counts.get(d, 0) + 1
    if not counts:
        return None, 0
    best = min(counts, key=lambda d: (-counts[d], d))
    return best, counts[best]
