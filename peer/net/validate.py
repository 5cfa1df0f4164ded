"""Validation before use: every handler's request passes here first (server.Servicer), after
peer.net.auth established who sent it. Every number a request carries must be finite and within
its field's range (a NaN wait or a negative offset never reaches a handler), and a field that names
a peer speaks only for the caller: a request whose claimed id is not the signed caller's is refused,
so nobody speaks for anyone else. Message sizes are bounded before any allocation by the channel
options (client.MAX_MESSAGE_BYTES). Runs on the network loop."""

from __future__ import annotations

import math
from collections import Counter

import grpc
import torch

from peer._proto import peer_pb2 as pb
from peer.codecs import all_finite
from peer.net.client import Reject

# The field of each request that names its sender; it must be the signed caller.
_SENDER = {
    pb.JoinRequest: lambda r: r.member.peer_id,
    pb.CommitRequest: lambda r: r.peer_id,
    pb.ProgressRequest: lambda r: r.peer_id,
    pb.ShardRequest: lambda r: r.requester,
    pb.DialBackRequest: lambda r: r.peer_id,
    pb.ShardHeader: lambda r: r.sender,
}
# Requests whose requester field is only a name for logs: it is replaced by the caller's id.
_NAMED = (pb.StateRequest, pb.UpdatesRequest)


def request(message, caller_id: str) -> None:
    """Refuses a request whose numbers are out of range (INVALID_ARGUMENT) or that speaks for
    another peer than its signer (PERMISSION_DENIED): what every handler's request passes first."""
    numbers(message)
    texts(message)
    sender(message, caller_id)


# ---- numbers: each request's fields and their ranges ----------------------------------------------
I64 = 2**63 - 1
MAX_STEPS, MAX_RATE = 10**9, 1e6   # a Progress report: inner steps in a round, steps/s
MAX_BPS = 1e12                      # an announced upload rate (bytes/s), the bound of a DHT record
MAX_LISTED = 4096                   # peer ids or hashes one request may list
_ROUND = (0, I64)
_COUNT = (0, MAX_LISTED)

# (field, value, lowest, highest) of every number each request carries (for a list, its length)
_RANGES = {
    pb.JoinRequest: lambda r: [
        ("round", r.round, *_ROUND), ("member.weight", r.member.weight, 0, math.inf),
        ("member.carried_weight", r.member.carried_weight, 0, math.inf), ("member.samples", r.member.samples, 0, I64),
        ("member.carried_round", r.member.carried_round, -1, I64),
        ("member.upload_bps", r.member.upload_bps, 0, MAX_BPS), ("len(skip)", len(r.skip), *_COUNT)],
    pb.ShardRequest: lambda r: [("round", r.round, *_ROUND), ("shard", r.shard, 0, I64),
                                ("wait_s", r.wait_s, 0, math.inf)],
    pb.CommitRequest: lambda r: [("round", r.round, *_ROUND), ("len(shard_sha256)", len(r.shard_sha256), *_COUNT),
                                 ("len(unreachable)", len(r.unreachable), *_COUNT)],
    pb.StateRequest: lambda r: [("offset", r.offset, 0, I64), ("length", r.length, 0, I64)],
    pb.UpdatesRequest: lambda r: [("from_round", r.from_round, *_ROUND),
                                  ("to_round", r.to_round, r.from_round + 1, I64)],
    pb.ProgressRequest: lambda r: [("round", r.round, *_ROUND), ("steps", r.steps, 0, MAX_STEPS),
                                   ("rate", r.rate, 0, MAX_RATE)],
    pb.DialBackRequest: lambda r: [("timeout_s", r.timeout_s, 0, math.inf),
                                   ("len(tcp_addresses)", len(r.tcp_addresses), *_COUNT)],
    pb.ShardHeader: lambda r: [
        ("round", r.round, *_ROUND), ("shard", r.shard, 0, I64), ("numel", r.numel, 0, I64),
        ("num_bytes", r.num_bytes, 0, I64), ("total_weight", r.total_weight, 0, math.inf),
        ("len(contributors)", len(r.contributors), *_COUNT), ("len(weights)", len(r.weights), *_COUNT),
        ("len(parts_sha256)", len(r.parts_sha256), *_COUNT), ("weights[]", _worst(r.weights), 0, math.inf)],
}


def _worst(values) -> float:
    """The first value of a list that is not a finite number >= 0 (0 when all are)."""
    return next((v for v in values if not (math.isfinite(v) and v >= 0)), 0.0)


def numbers(message) -> None:
    """Refuses (INVALID_ARGUMENT, naming the field) a request with a number that is NaN, infinite
    or outside its field's range; requests without numbers (Health, LinkTest) pass."""
    for name, value, low, high in _RANGES.get(type(message), lambda r: [])(message):
        if not (math.isfinite(value) and low <= value <= high):   # NaN fails every comparison
            raise Reject(grpc.StatusCode.INVALID_ARGUMENT,
                         f"{type(message).__name__}.{name} is {value!r}: expected a finite number in [{low:g}, {high:g}]")


MAX_PIECES = 8   # shards one owner may hold in a roster (peer.net.shardmap.pieces): bounds a leader's cut
MAX_TEXT = 512   # characters of a string field (ids, hashes, addresses, codec names); free-text `reason`s aside


def texts(message) -> None:
    """Refuses (INVALID_ARGUMENT) a string field longer than MAX_TEXT, in the request or a message in it:
    a refusal or a log line that quotes it stays short."""
    for f, value in message.ListFields():
        if f.type == f.TYPE_MESSAGE and not f.is_repeated:
            texts(value)
        elif f.type == f.TYPE_STRING and f.name != "reason":
            longest = max((len(v) for v in value), default=0) if f.is_repeated else len(value)
            if longest > MAX_TEXT:
                raise Reject(grpc.StatusCode.INVALID_ARGUMENT, f"{type(message).__name__}.{f.name} has a string of "
                                                               f"{longest} characters: at most {MAX_TEXT}")


def sender(request, caller_id: str) -> None:
    """Refuses (PERMISSION_DENIED) a request that claims to come from another peer than its signer."""
    if isinstance(request, _NAMED):
        request.requester = caller_id
        return
    claimed = _SENDER[type(request)](request)
    if claimed != caller_id:
        raise Reject(grpc.StatusCode.PERMISSION_DENIED,
                     f"the call is signed by {caller_id[-6:]} but claims to come from {claimed[-6:] or '(nobody)'!r}: "
                     "a peer speaks only for itself")


# ---- claims: what a member says it did ----------------------------------------------------------
# A member's weight and samples count at most CLAIM_CAP times the group's median (the upper middle
# value of an even group, so a fast half is never capped by a slow half; with two members the smaller
# claim), so no one claim outweighs the group; and at Join
# a member's fresh work may exceed what it published it did (its signed DHT record, its Progress
# reports to the leader, the steps the leader allowed it) only by CLAIM_SLACK and a few steps.
CLAIM_CAP = 4.0
CLAIM_SLACK = 1.25
CLAIM_STEPS = 4          # steps a claim may be ahead of the evidence (a record is up to a refresh old)
UNGRANTED_STEPS = 64     # a Progress report counts at most this many steps beyond what the leader allowed


def lower_median(values: list[float]) -> float:
    """The group's median claim for the caps: the smaller of two, else the upper middle value."""
    ordered = sorted(values)
    if not ordered:
        return 0.0
    return ordered[0] if len(ordered) == 2 else ordered[len(ordered) // 2]


def cap_claims(members: list[pb.Member]) -> list[pb.Member]:
    """Each member's weight, carried weight and samples capped at CLAIM_CAP times the group's lower
    median (carried weight scaled with its weight), in place; deterministic (the roster carries it)."""
    if len(members) < 2:
        return members
    w_cap = CLAIM_CAP * lower_median([m.weight for m in members])
    s_cap = int(CLAIM_CAP * lower_median([float(m.samples) for m in members]))
    for m in members:
        if m.weight > w_cap:
            m.carried_weight *= w_cap / m.weight
            m.weight = w_cap
        m.samples = min(m.samples, max(s_cap, 0))
    return members


def cap_steps(unreported: list[float], reported: list[float]) -> list[float]:
    """The steps of each peer the leader sees training only in the DHT view (`unreported`: its record's
    steps, extrapolated), each at most CLAIM_CAP times the lower median of every training peer's steps
    (these and the Progress reports, `reported`) plus CLAIM_STEPS: a record that publishes huge steps
    cannot close a round early. With a single peer in all, nothing is capped."""
    everyone = unreported + reported
    if len(everyone) < 2:
        return unreported
    cap = CLAIM_CAP * lower_median(everyone) + CLAIM_STEPS
    return [min(s, cap) for s in unreported]


def capped(members) -> bool:
    """True when no member's claim exceeds the caps (what a member checks of a roster it got)."""
    members = list(members)
    if len(members) < 2:
        return True
    w_cap = CLAIM_CAP * lower_median([m.weight for m in members])
    s_cap = int(CLAIM_CAP * lower_median([float(m.samples) for m in members]))
    return all(m.weight <= w_cap * (1 + 1e-12) and m.samples <= max(s_cap, 0) for m in members)


def join_claim(m: pb.Member, r: int, record, reported: tuple[int, float, float] | None, allowed: int | None,
               weighting: str) -> str:
    """Why a joiner's fresh work is not backed by what it published ("" when it is). `record`: its
    fresh, signed PeerRecord from the view (None: it has none); `reported`/`allowed`: the leader's
    tally of its Progress reports for round r."""
    if record is None:
        return "no fresh signed progress record of it in the DHT (only peers that publish one may join)"
    if record.spec and record.addr and m.address and not m.client_mode and record.addr != m.address:
        return f"its address {m.address} is not the one its record gives ({record.addr})"
    steps = [float(allowed or 0), float(reported[0]) if reported else 0.0]
    if record.round == r:
        steps.append(record.steps_now())
    evidence = max(steps)
    limit_steps = CLAIM_SLACK * evidence + CLAIM_STEPS
    per_step = record.samples / record.steps if record.round == r and record.steps > 0 else None
    fresh = m.weight - m.carried_weight
    if weighting == "steps" and fresh > limit_steps:
        return f"claims {fresh:g} steps, but published {evidence:g}"
    if weighting == "equal" and fresh > 1.0 + 1e-9:
        return f"claims a fresh weight of {fresh:g}, but every contribution weighs 1 (--weighting equal)"
    if per_step is not None:
        limit_samples = CLAIM_SLACK * per_step * limit_steps + 1
        if m.samples > limit_samples or (weighting == "samples" and fresh > limit_samples):
            return f"claims {max(m.samples, fresh if weighting == 'samples' else 0):g} samples, but published " \
                   f"{per_step:g} a step over about {evidence:g} steps"
    return ""


def roster(r: pb.Roster, numel: int, codec: str, me: str, trusted: list[str] | None = None) -> str:
    """Why a roster our leader sent cannot be used ("" when it can): members sorted and unique, we
    among them, owners among the serving members (and the run's trusted owners, when it names
    some), shard bounds covering [0, numel), the run's codec, every claim within the caps."""
    ids = [m.peer_id for m in r.members]
    if ids != sorted(set(ids)):
        return "members are not sorted and unique"
    if me not in ids:
        return "we are not among its members"
    serving = {m.peer_id for m in r.members if not m.client_mode}
    runs = [o for i, o in enumerate(r.owners) if i == 0 or r.owners[i - 1] != o]   # each owner's pieces, together
    if not r.owners or set(r.owners) - serving or len(runs) != len(set(runs)):
        return "owners are not serving members, each listed once for its pieces in a row"
    if max(Counter(r.owners).values()) > MAX_PIECES:
        return f"an owner holds more than {MAX_PIECES} pieces"
    if trusted and set(r.owners) - set(trusted):
        return f"owners {sorted(o[-6:] for o in set(r.owners) - set(trusted))} are not among the run's --trusted-owners"
    b = list(r.shard_bounds)
    if len(b) != len(r.owners) + 1 or b[0] != 0 or b[-1] != numel or any(x >= y for x, y in zip(b, b[1:], strict=False)):
        return f"shard bounds {b[:4]}... do not cover {numel} values"
    if r.codec != codec or r.numel != numel:
        return f"codec {r.codec!r} / numel {r.numel} are not the run's ({codec!r}, {numel})"
    if not capped(r.members):
        return "a member's weight or samples exceed the caps"
    return ""


# ---- values ------------------------------------------------------------------------------------
def contribution(values: torch.Tensor) -> str:
    """Why decoded shard values cannot be averaged ("" when they can): NaN or infinity."""
    return "" if all_finite(values) else "NaN or infinite values"
