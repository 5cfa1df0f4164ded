"""Group agreement for one round: the leader's side (collect Joins, close the group, answer
everyone with one roster; collect commit reports, answer everyone with one decision), the
pure helpers both sides share (leader order, roster, checks of a joiner's claim; the shard map is
shardmap.py)
and the Outcome a round ends with for the trainer. Runs on the network loop."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from peer._proto import peer_pb2 as pb
from peer.codecs import get_codec
from peer.net import validate
from peer.net.shardmap import SLOW_FRACTION, piece_size, pieces, shard_plan
from peer.net.verify import OwnerRule

ANY_OWNER = OwnerRule()   # every serving member may own a shard

log = logging.getLogger(__name__)


def leader_rank(run_id: str, round_: int, peer_id: str) -> str:
    """Leadership rotates: the candidate with the smallest rank leads the round."""
    return hashlib.sha256(f"{run_id}/{round_}/{peer_id}".encode()).hexdigest()


def roster_hash(r: pb.Roster) -> str:
    body = {
        "round": r.round, "leader": r.leader, "codec": r.codec, "numel": r.numel,
        "bounds": list(r.shard_bounds), "owners": list(r.owners),
        "members": [[m.peer_id, m.address, m.weight, m.samples, m.client_mode, m.carried_weight, m.carried_round,
                     m.upload_bps] for m in r.members],
    }
    return hashlib.sha256(json.dumps(body, separators=(",", ":")).encode()).hexdigest()


def make_roster(round_: int, leader: str, members: list[pb.Member], codec: str, numel: int,
                owners: OwnerRule = ANY_OWNER, sizing: str = "rate") -> pb.Roster:
    """Members sorted by peer id; owners and bounds from the upload rates of the serving members
    `owners` allows (peer.net.verify); with `sizing` "equal" (--shard-sizing) every one of them owns
    an equal shard, whatever its rate."""
    members = validate.cap_claims([pb.Member.FromString(m.SerializeToString()) for m in
                                   sorted(members, key=lambda m: m.peer_id)])   # copies: the joiners' claims stay
    serving = owners.eligible([m for m in members if not m.client_mode])
    if not serving:
        raise ValueError("no serving member may own a shard (--trusted-owners: none of them joined)")
    rates = [m.upload_bps if sizing == "rate" else 0.0 for m in serving]   # no rate known: equal shards
    owners, bounds = pieces(*shard_plan(numel, [m.peer_id for m in serving], rates), get_codec(codec).encoded_size,
                            piece_bytes=piece_size([m.upload_bps for m in serving]))
    r = pb.Roster(round=round_, leader=leader, members=members, owners=owners, codec=codec, numel=numel,
                  shard_bounds=bounds)
    r.hash = roster_hash(r)
    return r


class ClosedElsewhere(Exception):
    """The peers this group waited for are in another group of the same round."""


class LeaderGroup:
    """The leader's view of one round: who joined, the roster once closed, the commit."""

    def __init__(self, round_: int, leader: str, codec: str, numel: int, owners: OwnerRule = ANY_OWNER,
                 sizing: str = "rate"):
        self.round, self.leader, self.codec, self.numel = round_, leader, codec, numel
        self.owners = owners   # who may own shards (trusted, not suspected)
        self.sizing = sizing   # --shard-sizing: by upload rate, or equal
        self.members: dict[str, pb.Member] = {}
        self.roster: asyncio.Future[pb.Roster] = asyncio.get_running_loop().create_future()
        self.first_join_at: float | None = None
        self.reports: dict[str, pb.CommitRequest] = {}
        self.decision: asyncio.Future[pb.CommitReply] = asyncio.get_running_loop().create_future()
        self.first_report_at: float | None = None
        self.probing = False          # asking missing members whether they are in another group
        self.probed = False
        self._changed = asyncio.Event()   # set (and replaced) whenever a join, a report or the close lands

    def fail(self, error: BaseException) -> None:
        """Ends the group without a roster (its joiners are told it closed)."""
        if not self.roster.done():
            self.roster.set_exception(error)
        self._signal()

    def probe_done(self) -> None:
        self.probing, self.probed = False, True
        self._signal()

    def _signal(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def changed(self, timeout_s: float) -> None:
        """Returns at the next join, report, close or probe result, or after timeout_s."""
        try:
            await asyncio.wait_for(self._changed.wait(), max(0.0, timeout_s))
        except asyncio.TimeoutError:
            pass

    def decide_in(self, window_s: float) -> float:
        """Seconds until maybe_decide stops waiting for the missing reports (inf before the first)."""
        if self.first_report_at is None:
            return math.inf
        return window_s - (time.monotonic() - self.first_report_at)

    def close_in(self, window_s: float) -> float:
        """Seconds until the join window passes (inf before the first join)."""
        if self.first_join_at is None:
            return math.inf
        return window_s - (time.monotonic() - self.first_join_at)

    @property
    def closed(self) -> bool:
        return self.roster.done()

    def add(self, member: pb.Member) -> None:
        self.members[member.peer_id] = member
        if self.first_join_at is None:
            self.first_join_at = time.monotonic()
        self._signal()

    def maybe_close(self, expected: set[str], window_s: float) -> bool:
        """Closes when every expected live peer joined, or the join window has passed and the
        missing ones were asked whether they are in another group (see group.handle_join)."""
        if self.closed or self.first_join_at is None:
            return self.closed
        waited = time.monotonic() - self.first_join_at
        missing = expected - set(self.members)
        if (missing and (waited < window_s or not self.probed)) or self.probing:
            return False
        if not any(not m.client_mode for m in self.members.values()):
            self.fail(RuntimeError("no serving member joined: every joiner is in client mode"))
            return True
        if missing:
            log.info("round %d: closing the group without %s (no Join within %.1f s)",
                     self.round, ", ".join(sorted(p[-6:] for p in missing)), window_s)
        if not self.owners.eligible([m for m in self.members.values() if not m.client_mode]):
            self.fail(RuntimeError("no trusted owner joined (--trusted-owners): nobody may reduce a shard"))
            return True
        roster = make_roster(self.round, self.leader, list(self.members.values()), self.codec, self.numel,
                             self.owners, self.sizing)
        serving = [m for m in roster.members if not m.client_mode]
        eligible = {m.peer_id for m in self.owners.eligible(serving)}
        barred = sorted(m.peer_id[-6:] for m in serving if m.peer_id not in eligible)
        slow = sorted(p[-6:] for p in eligible - set(roster.owners))
        if barred:
            log.info("round %d: %s own no shard (%s)", self.round, ", ".join(barred),
                     "not among the run's --trusted-owners" if self.owners.trusted else
                     "suspected of lying as reducers: peer.net.verify")
        if slow:
            log.info("round %d: %s own no shard (upload rate under 1/%d of the median)",
                     self.round, ", ".join(slow), SLOW_FRACTION)
        self.roster.set_result(roster)
        self._signal()
        return True

    def window_over(self, expected: set[str], window_s: float) -> set[str]:
        """The expected peers still missing once the join window has passed (else empty)."""
        if self.closed or self.first_join_at is None or time.monotonic() - self.first_join_at < window_s:
            return set()
        return expected - set(self.members)

    def add_report(self, report: pb.CommitRequest) -> None:
        self.reports[report.peer_id] = report
        if self.first_report_at is None:
            self.first_report_at = time.monotonic()
        self._signal()

    def maybe_decide(self, window_s: float) -> bool:
        """Decides once every member reported or `window_s` passed since the first report."""
        if self.decision.done() or not self.roster.done() or self.first_report_at is None:
            return self.decision.done()
        roster = self.roster.result()
        waiting = {m.peer_id for m in roster.members} - set(self.reports)
        # dead: no report will come. A member's report speaks only for itself: another member is given up on
        # when the leader's own report names it, or two reports do
        named = Counter(p for r in self.reports.values() for p in set(r.unreachable))
        mine = self.reports.get(self.leader)
        waiting -= {p for p, n in named.items() if n >= 2 or (mine is not None and p in mine.unreachable)}
        if waiting and time.monotonic() - self.first_report_at < window_s:
            return False
        self.decision.set_result(decide(roster, self.reports))
        return True


def decide(roster: pb.Roster, reports: dict[str, pb.CommitRequest]) -> pb.CommitReply:
    """Apply only if every report came in ok and all of them hold the same shard hashes."""
    failed = [f"{p[-6:]}: {r.reason}" for p, r in sorted(reports.items()) if not r.ok]
    if failed:
        return pb.CommitReply(apply=False, reason="members failed to gather: " + "; ".join(failed))
    hashes = {tuple(r.shard_sha256) for r in reports.values()}
    if len(hashes) != 1:
        return pb.CommitReply(apply=False, reason=f"members hold {len(hashes)} different results")
    missing = sorted({m.peer_id for m in roster.members} - set(reports))
    reason = f"no report from {', '.join(p[-6:] for p in missing)}" if missing else ""
    unreachable = sorted({p for r in reports.values() for p in r.unreachable})
    return pb.CommitReply(apply=True, reason=reason, committed=sorted(reports), shard_sha256=hashes.pop(),
                          unreachable=unreachable)


# Why a roster member is missing from the contributors of some shard of an applied round, as
# this member sees it: short fixed words (log lines, metrics rows, Prometheus labels), the
# first that holds in this order.
DROP_REASONS = {
    "unreachable": "this peer could not send its part to it or pull its shard from it",
    "reported_unreachable": "another member could not reach it (the leader's decision lists it)",
    "no_report": "it sent the leader no commit report (it left the round or died)",
    "backup": "its own shard was reduced again by the backup owner, without its part",
    "send_failed": "this peer's part of a shard did not reach that shard's owner",
    "not_received": "an owner reduced a shard without its part (none came whole within the transfer timeout)",
}


def drop_reasons(roster: pb.Roster, headers: list[pb.ShardHeader], me: str, unreachable: set[str],
                 decision: pb.CommitReply) -> dict[str, str]:
    """{peer id: reason} for every roster member not among the contributors of every shard.
    `headers`: the reduced shards' headers; `unreachable`: the peers our own calls failed on."""
    everywhere = set.intersection(*(set(h.contributors) for h in headers)) if headers else set()
    reported, committed = set(decision.unreachable), set(decision.committed)
    out = {}
    for p in sorted({m.peer_id for m in roster.members} - everywhere):
        lacking = [h for h in headers if p not in h.contributors]
        if p in unreachable:
            out[p] = "unreachable"
        elif p in reported:
            out[p] = "reported_unreachable"
        elif p not in committed:
            out[p] = "no_report"
        elif any(h.backup and roster.owners[h.shard] == p for h in headers):
            out[p] = "backup"
        elif p == me and any(roster.owners[h.shard] in unreachable for h in lacking):
            out[p] = "send_failed"
        else:
            out[p] = "not_received"
    return out


@dataclass
class Outcome:
    """How a round ended for this peer: applied, aborted (by everyone) or excluded."""

    kind: str
    reason: str = ""
    decided: bool = False   # the leader's decision was heard (an abort by everyone)
    avg: torch.Tensor | None = None
    roster: pb.Roster | None = None
    contributors: list[str] = field(default_factory=list)   # contributed to every shard
    total_weight: float = 0.0
    samples: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    dropped: list[str] = field(default_factory=list)
    drop_reasons: dict[str, str] = field(default_factory=dict)   # dropped peer -> a DROP_REASONS word
    payloads: list[bytes] = field(default_factory=list)   # the reduced shards' bytes, in shard order
    residuals: list = field(default_factory=list)   # error-feedback updates of our sends, if applied
    owner_residuals: list = field(default_factory=list)   # ... and of our owned shards' re-encoding


MAX_CARRY_ROUNDS = 3    # carried work older than this many rounds is refused
PROGRESS_STALE_S = 1.0  # a member silent this long no longer holds steps it was allowed
LEASE_S = 0.5           # steps are allowed for about this much of a member's time at once


class Tally:
    """The leader's count of one round's inner steps, from its members' Progress reports, as
    leases: each answer allows a member about LEASE_S of steps more (its rate's share of the
    steps nobody holds yet, near the end), and members ask again before they go past it. The
    swarm's steps thus close the round at its target (a DHT view lags a refresh behind, which
    fast steps overrun many times). Pure; the caller passes the clock."""

    def __init__(self, target_steps: int):
        self.target = target_steps
        self.reports: dict[str, tuple[int, float, float]] = {}   # peer -> (steps, steps/s, when)
        # a report counts at most validate.UNGRANTED_STEPS beyond the steps allowed (no peer outbids the round)
        self.allowed: dict[str, int] = {}   # steps in all each member may do: held until it reports

    def _held(self, peer: str, now: float) -> int:
        """Steps a member did or may still do without asking (a silent one: only those done)."""
        steps, _, when = self.reports[peer]
        return max(steps, self.allowed.get(peer, steps)) if now - when < PROGRESS_STALE_S else steps

    def report(self, peer: str, steps: int, rate: float, now: float, unreported: Sequence[float] = (),
               unreported_rate: float = 0.0) -> tuple[int, bool, int]:
        """Records a member's report; returns (steps it may do in all, stop now, the swarm's
        steps held). `unreported`: the steps of each peer seen training only in the DHT (each counts
        at most validate.cap_steps allows: a forged record does not close the round), and their rate."""
        steps = min(steps, self.allowed.get(peer, 0) + validate.UNGRANTED_STEPS)
        self.reports[peer] = (steps, rate, now)
        seen = validate.cap_steps(list(unreported), [s for s, _, _ in self.reports.values()])
        others = sum(self._held(p, now) for p in self.reports if p != peer) + sum(seen)
        pool = self.target - steps - others
        if pool < 1 and steps == 0:   # a member that began the round late still does one step: its
            self.allowed[peer] = 1    # work counts (the target overruns by one step per late member)
            return 1, False, round(others)
        if pool < 1:   # every step of the target is done or held by another member
            self.allowed[peer] = steps
            return steps, True, round(steps + others)
        rates = [r for p, (_, r, when) in self.reports.items() if p != peer and r > 0 and now - when < PROGRESS_STALE_S]
        own = rate if rate > 0 else (sum(rates) / len(rates) if rates else 1.0)  # no step timed yet: the mean
        share = pool * own / (own + sum(rates) + unreported_rate)
        lease = max(1, min(int(pool), int(share), int(own * LEASE_S)))
        self.allowed[peer] = steps + lease
        return self.allowed[peer], False, round(steps + others)


def check_member(m: pb.Member, round_: int) -> str:
    """Why a joiner's claim is not acceptable ("" when it is): weights finite and positive,
    carried work no heavier than the fresh work and from one of the last few rounds."""
    if not (math.isfinite(m.weight) and m.weight > 0 and m.samples >= 0):
        return f"weight {m.weight} / samples {m.samples} are not a positive, finite claim"
    fresh = m.weight - m.carried_weight
    if m.carried_weight < 0 or m.carried_weight > fresh:
        return f"carried weight {m.carried_weight} exceeds its fresh weight {fresh}"
    if m.carried_weight > 0 and not round_ - MAX_CARRY_ROUNDS <= m.carried_round < round_:
        return f"carried work from round {m.carried_round} is not from the last {MAX_CARRY_ROUNDS} rounds"
    if not m.peer_id or (not m.client_mode and not m.address):
        return "a serving member needs a peer id and an address"
    return ""
