"""The run's records in the DHT: spec proposals, peer progress/membership, digests and each
peer's recent rounds (the history the swarm view shows). Runs on the network loop; every DHT
call is a `return_future=True` call under a deadline. Whatever is read was written by a stranger:
parsers return None for a malformed value, never raise."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import hivemind
from hivemind.utils import get_dht_time

from peer.records import member_key_of, opened, owner_of, owner_subkey, sealed

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


async def store(dht: hivemind.DHT, key: str, value: Any, timeout_s: float) -> bool:
    """Stores `value` under our own protected subkey of `key`, signed with the DHT node's identity
    (`peer.records`): a peer writes only its own records. False when no node kept it."""
    identity = getattr(dht, "identity", None)
    if identity is None:
        raise TypeError("swarm.store needs a DHT made by peer.dht.create_dht (it signs with the node's identity)")
    value = sealed(member_key_of(dht), key, identity.peer_id, value)   # a private run's member proof
    fut = dht.store(key, value, get_dht_time() + RECORD_TTL_S, subkey=owner_subkey(identity), return_future=True)
    return bool(await dht_call(fut, timeout_s, f"store {key}"))


@dataclass(frozen=True)
class Read:
    """What one DHT key holds: the members' values by peer id; the values of signed peers without this
    private run's member proof (strangers, or another secret's peers; none in a public run); how many
    subkeys were unprotected or malformed (nobody signed them as a peer)."""

    members: dict[str, Any]
    outsiders: dict[str, Any]
    unsigned: int


_SAID_OUTSIDERS: set[str] = set()   # peers whose records were said to be skipped (once each, bounded)


async def read_all(dht: hivemind.DHT, key: str, timeout_s: float) -> Read:
    """Every signed value of `key`, members and outsiders apart (a public run has no outsiders)."""
    found = await dht_call(dht.get(key, latest=True, return_future=True), timeout_s, f"get {key}")
    if found is None or not isinstance(found.value, dict):
        return Read({}, {}, 0)
    members, outsiders, unsigned, member_key = {}, {}, 0, member_key_of(dht)
    for sub, item in found.value.items():
        peer_id = owner_of(sub)
        if peer_id is None:
            unsigned += 1
            continue
        value, member = opened(member_key, key, peer_id, item.value)
        (members if member else outsiders)[peer_id] = value
    for peer_id in outsiders.keys() - _SAID_OUTSIDERS:
        if len(_SAID_OUTSIDERS) < 1000:
            _SAID_OUTSIDERS.add(peer_id)
            log.info("ignoring %s's records: they carry no proof of this private run's secret (a stranger, or a "
                     "peer of a run with another secret)", peer_id[-6:])
    return Read(members, outsiders, unsigned)


async def read_counted(dht: hivemind.DHT, key: str, timeout_s: float) -> tuple[dict[str, Any], int]:
    """The members' values of `key` by peer id (read_all), and how many subkeys were skipped
    (unprotected, malformed, or without this private run's member proof)."""
    found = await read_all(dht, key, timeout_s)
    return found.members, found.unsigned + len(found.outsiders)


async def read(dht: hivemind.DHT, key: str, timeout_s: float) -> dict[str, Any]:
    """The values of `key` by signer's peer id (an empty dict when there is none); see read_counted."""
    return (await read_counted(dht, key, timeout_s))[0]


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
    upload_bps: float = 0.0  # its measured upload rate, capped by --max-upload-mbit (bytes/s; 0 = not known)

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
                      t=float(v["t"]), phase=str(v["phase"]), upload_bps=float(v.get("upload_bps", 0.0)))
        except (KeyError, TypeError, ValueError):
            log.debug("ignoring malformed progress record of %s: %r", peer_id, v)
            return None
        if (rec.rate < 0 or rec.steps < 0 or rec.rate > 1e6 or rec.phase not in PHASES
                or not (math.isfinite(rec.upload_bps) and 0 <= rec.upload_bps <= 1e12)):
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


def history_key(run_id: str) -> str:
    return f"{run_id}.history"


def winning_spec(proposals: dict[str, Any]) -> dict[str, Any] | None:
    """The run's spec record among the proposals read from `{run}.spec`: the earliest `created`,
    ties by origin peer id (None when none is well formed). Its `spec` field is still unchecked."""
    valid = [v for v in proposals.values() if isinstance(v, dict) and isinstance(v.get("created"), (int, float))
             and isinstance(v.get("origin"), str)]
    return min(valid, key=lambda v: (v["created"], v["origin"])) if valid else None


async def read_peers(dht: hivemind.DHT, run_id: str, timeout_s: float) -> dict[str, PeerRecord]:
    out = {}
    for pid, v in (await read(dht, peers_key(run_id), timeout_s)).items():
        rec = PeerRecord.parse(pid, v)
        if rec is not None:
            out[pid] = rec
    return out


def quorum(signers: int) -> int:
    """How many distinct signers a digest needs before a peer trusts it over its own state: a strict
    majority of those that signed one for the round (so at least 2 as soon as 2 did)."""
    return signers // 2 + 1


def trusted_digest(digests: dict[str, str]) -> tuple[str | None, int]:
    """majority_digest of {signer: digest}, or (None, its count) when it lacks a quorum of the signers."""
    best, count = majority_digest(digests)
    return (best if best is not None and count >= quorum(len(digests)) else None), count


def majority_digest(digests: dict[str, str]) -> tuple[str | None, int]:
    """The digest most peers published and how many did (ties: the smaller digest)."""
    counts: dict[str, int] = {}
    for d in digests.values():
        counts[d] = counts.get(d, 0) + 1
    if not counts:
        return None, 0
    best = min(counts, key=lambda d: (-counts[d], d))
    return best, counts[best]


# ---- {run}.history: a peer's recent rounds ---------------------------------------------------
HISTORY_ROUNDS = 60        # rounds a peer keeps in its history record
DROP_ROUNDS = 10           # of those, the last rounds that dropped someone, with who and why
MAX_DROPS_PER_ROUND = 16   # dropped peers kept per round (the rest are left out)
MAX_ID_CHARS, MAX_REASON_CHARS = 80, 120
# the columns of one compact row, in order (`history_row` writes them, `parse_history` checks them)
HISTORY_FIELDS = ("round", "outcome", "loss", "eval_loss", "weight", "samples_per_s", "group_size",
                  "global_samples", "time")
OUTCOMES = ("applied", "aborted", "excluded")


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


_CHECKS = {"round": _count, "outcome": lambda x: x in OUTCOMES, "loss": lambda x: x is None or _number(x),
           "eval_loss": lambda x: x is None or _number(x), "weight": lambda x: _number(x) and x >= 0,
           "samples_per_s": lambda x: _number(x) and x >= 0, "group_size": _count, "global_samples": _count,
           "time": _number}


def history_row(row: dict[str, Any]) -> list[Any]:
    """The compact form of one metrics row (`Trainer.report`'s dict) kept in the history record."""
    def num(x: Any) -> float | None:
        return float(x) if _number(x) else None

    return [int(row["round"]), str(row["outcome"]), num(row.get("loss")), num(row.get("eval_loss")),
            num(row.get("weight")) or 0.0, num(row.get("samples_per_s")) or 0.0, int(row.get("group_size") or 0),
            int(row.get("global_samples") or 0), float(row.get("time") or 0.0)]


def round_drops(row: dict[str, Any]) -> dict[str, str]:
    """Who a round dropped and why: the row's `drop_reasons`, else its `dropped` ids with reason
    "unknown"; bounded (ids and reasons cut, at most MAX_DROPS_PER_ROUND peers)."""
    reasons = row.get("drop_reasons")
    if not isinstance(reasons, dict):
        reasons = {p: "unknown" for p in row.get("dropped") or ()}
    items = sorted((str(p)[:MAX_ID_CHARS], str(why)[:MAX_REASON_CHARS]) for p, why in reasons.items())
    return dict(items[:MAX_DROPS_PER_ROUND])


def _drops_ok(d: Any) -> bool:
    return (isinstance(d, list) and len(d) == 2 and _count(d[0]) and isinstance(d[1], dict)
            and len(d[1]) <= MAX_DROPS_PER_ROUND
            and all(isinstance(p, str) and isinstance(why, str) and 0 < len(p) <= MAX_ID_CHARS
                    and len(why) <= MAX_REASON_CHARS for p, why in d[1].items()))


def parse_history(peer_id: str, v: Any) -> dict[str, Any] | None:
    """A history record read from the DHT as `{"rows": [{field: value}], "drops": [{"round",
    "peer", "reason"}], "t"}`, or None (logged at DEBUG) when any part of it is malformed or
    over the bounds: a stranger's bad value is skipped whole, never shown in part."""
    try:
        rows, drops, t = v["rows"], v["drops"], v["t"]
        ok = (isinstance(rows, list) and len(rows) <= HISTORY_ROUNDS and isinstance(drops, list)
              and len(drops) <= DROP_ROUNDS and _number(t)
              and all(isinstance(r, list) and len(r) == len(HISTORY_FIELDS)
                      and all(_CHECKS[f](x) for f, x in zip(HISTORY_FIELDS, r, strict=True)) for r in rows)
              and all(_drops_ok(d) for d in drops))
    except (KeyError, TypeError):
        ok = False
    if not ok:
        log.debug("ignoring malformed history record of %s: %.200r", peer_id, v)
        return None
    return {"rows": [dict(zip(HISTORY_FIELDS, r, strict=True)) for r in rows],
            "drops": [{"round": r, "peer": p, "reason": why} for r, d in drops for p, why in sorted(d.items())],
            "t": float(t)}


class RoundClock:
    """How often the swarm closes a round, from when this peer saw its top round advance (the
    last ROUND_MARKS advances). Replaced, never changed in place: the keeper reads it."""

    ROUND_MARKS = 6

    def __init__(self) -> None:
        self.marks: list[tuple[float, int]] = []  # (monotonic time, swarm round) when it advanced

    def mark(self, top: int) -> None:
        if top >= 0 and (not self.marks or top > self.marks[-1][1]):
            self.marks = [*self.marks, (time.monotonic(), top)][-self.ROUND_MARKS:]

    def period_s(self) -> float | None:
        """Seconds between two rounds of the swarm, as seen lately (None before two were seen)."""
        if len(self.marks) < 3:   # the first mark is when we started looking, not a round's end
            return None
        (t0, r0), (t1, r1) = self.marks[1], self.marks[-1]
        return (t1 - t0) / (r1 - r0)
