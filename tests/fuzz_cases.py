"""What the handler fuzz (tests/unit/test_fuzz_handlers.py) is made of: the round in progress at the
fuzzed peer as its members know it (World), one hostile call and what must happen to it (Case:
`expect` gives "" when the outcome is right, else why it is wrong), and the generic mutation: one
field, chosen through the message's descriptor, set to a boundary value of its type. The calls of
each RPC are made in tests/fuzz_rpcs.py."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import torch
from google.protobuf.descriptor import FieldDescriptor as F

from peer._proto import peer_pb2 as pb
from peer.codecs import get_codec
from peer.identity import Identity
from peer.net import validate
from peer.net.allreduce import payload_digest
from peer.net.client import MAX_MESSAGE_BYTES

OK, INVALID, DENIED = grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED
HAS = grpc.StatusCode.ALREADY_EXISTS   # the sender's part of the shard is in already: checked before its bytes
# Every call ends with one of these; anything else (UNKNOWN: a handler raised; INTERNAL, UNAVAILABLE) fails the test.
EXPECTED = {OK, INVALID, DENIED, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND,
            grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED,
            grpc.StatusCode.ABORTED, grpc.StatusCode.UNAUTHENTICATED}
BIG = MAX_MESSAGE_BYTES + 4096   # a message over the transport's bound
REFUSAL_S = 5.0   # the least deadline of a call validation must refuse (field_case)
NAN, INF = float("nan"), float("inf")
I64 = validate.I64


@dataclass
class World:
    """The round in progress at the fuzzed peer, as its members know it."""

    run_id: str
    spec_hash: str
    round: int
    roster: pb.Roster
    core_id: str
    members: list[Identity]     # client-mode members with a fresh record in the peer's view
    other_owner: Identity       # the serving member owning shard 1 (its address answers nothing)
    strangers: list[Identity]   # in no roster, with no record
    state_sha: str
    updates: tuple[int, int]    # the rounds of the update log [first, last]
    mine: int = 0               # the shard the fuzzed peer owns (its backup is the other owner)
    theirs: int = 1             # the shard the other owner owns (its backup is the fuzzed peer)
    before: World | None = None  # the round before, whose shards are reduced already

    def payload(self, member: str, shard: int) -> bytes:
        """The part of shard `shard` that `member` honestly sends in this round (fp32, seeded by both)."""
        seed = int.from_bytes(hashlib.sha256(f"{self.round}/{member}/{shard}".encode()).digest()[:8], "little")
        g = torch.Generator().manual_seed(seed)
        return get_codec("fp32").encode(torch.randn(self.numel(shard), generator=g))

    def numel(self, shard: int) -> int:
        b = self.roster.shard_bounds
        return b[shard + 1] - b[shard]

    def header(self, sender: str, payload: bytes, shard: int, backup: bool = False) -> pb.ShardHeader:
        return pb.ShardHeader(round=self.round, roster_hash=self.roster.hash, sender=sender, shard=shard,
                              codec="fp32", numel=self.numel(shard), num_bytes=len(payload),
                              sha256=payload_digest(payload), backup=backup)


@dataclass
class Case:
    rpc: str
    kind: str
    who: Identity
    request: object                 # a message; for a stream, a list of messages; for "raw", bytes
    expect: Callable[[grpc.StatusCode, object], str] = lambda code, reply: ""
    timeout_s: float = 3.0
    big: bool = False               # sent on a channel without the client's own size bound
    raw: str = ""                   # "bytes" (signed random bytes), "unsigned", "replay"
    then: list = field(default_factory=list)   # cases sent right after this one (a duplicate)


def code_in(*codes) -> Callable[[grpc.StatusCode, object], str]:
    def expect(code, reply) -> str:
        return "" if code in codes else f"expected {'/'.join(c.name for c in codes)}"
    return expect


def dropped(code, reply) -> str:
    """A part whose header is right but whose values are not: read, then dropped with accepted=False
    (the shard waits no longer for its sender), unless the sender's part is in already."""
    return "" if (code == OK and not reply.accepted) or code == HAS else \
        "expected accepted=False (dropped) or ALREADY_EXISTS"


def not_accepted(code, reply) -> str:
    """What validation must refuse: any error status, or an answer with accepted=False."""
    return "the contribution was accepted" if code == OK and reply.accepted else ""


# ---- boundary values of a field, by its type ------------------------------------------------------
def _ints(rng: random.Random, w: World) -> int:
    return rng.choice([-1, 0, 1, -(2**31), 2**31 - 1, I64, -I64 - 1, w.round - 1, w.round + 1, w.round + 10**6])


def strings(rng: random.Random, w: World) -> str:
    return rng.choice(["", "x" * 100_000, "\u202e\x00\ud7ff\U0001d518 \u0301", w.core_id, w.other_owner.peer_id,
                       w.members[0].peer_id, w.strangers[0].peer_id, "Qm" + "1" * 44, w.roster.hash[::-1]])


def mutate_field(rng: random.Random, msg, w: World) -> str:
    """Sets one field of `msg` (or of a message inside it) to a boundary value of its type; returns
    the mutation's kind ("nonfinite": a NaN, an infinity or a negative double; "-long": a list or a
    string over validate's bounds; these are always refused)."""
    f = rng.choice(msg.DESCRIPTOR.fields)
    if f.type == F.TYPE_MESSAGE and not f.is_repeated:
        return mutate_field(rng, getattr(msg, f.name), w)
    if f.is_repeated:
        values = getattr(msg, f.name)
        sample = {F.TYPE_STRING: w.members[1].peer_id, F.TYPE_DOUBLE: 1.0, F.TYPE_INT64: 4096}.get(f.type)
        if sample is None:   # repeated messages (none in requests): left as they are
            return "field-repeated"
        n = rng.choice([0, 2, validate.MAX_LISTED + 1])
        del values[:]
        values.extend([sample] * n)
        return "field-list-long" if n > validate.MAX_LISTED else "field-list"
    if f.type == F.TYPE_DOUBLE:
        value = rng.choice([NAN, INF, -INF, -1.0, 0.0, 5e-324, 1e308, 1e9])
        setattr(msg, f.name, value)
        return "nonfinite" if not value >= 0 or value == INF else "field-double"
    if f.type in (F.TYPE_INT64, F.TYPE_INT32):
        value = _ints(rng, w)
        setattr(msg, f.name, value if f.type == F.TYPE_INT64 else max(-(2**31), min(2**31 - 1, value)))
        return "field-int"
    if f.type == F.TYPE_STRING:
        setattr(msg, f.name, strings(rng, w))
        long = len(getattr(msg, f.name)) > validate.MAX_TEXT and f.name != "reason"   # free text: any length
        return "field-string-long" if long else "field-string"
    if f.type == F.TYPE_BOOL:
        setattr(msg, f.name, not getattr(msg, f.name))
        return "field-bool"
    if f.type == F.TYPE_ENUM:
        return "field-enum"
    setattr(msg, f.name, rng.randbytes(rng.choice([0, 7, 4096])))
    return "field-bytes"


def field_case(rng: random.Random, rpc: str, who: Identity, msg, w: World, timeout_s: float = 3.0) -> Case:
    """A call with one field mutated. A mutation validation always refuses must come back as
    INVALID_ARGUMENT, so its deadline is at least REFUSAL_S: the refusal comes before any long poll,
    and the deadline only bounds a loaded machine (CI once saw a long-list Commit, parsed and
    signature-checked on 2 busy cores, pass its 0.5 s as DEADLINE_EXCEEDED). The other mutations
    keep `timeout_s`: a request that still looks valid may be held by a long poll (Commit)."""
    kind = mutate_field(rng, msg, w)
    if kind in ("nonfinite", "field-list-long", "field-string-long"):
        return Case(rpc, kind, who, msg, code_in(INVALID), max(timeout_s, REFUSAL_S))
    return Case(rpc, kind, who, msg, lambda code, reply: "", timeout_s)
