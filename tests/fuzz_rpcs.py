"""Structured hostile calls for every RPC of a peer (tests/unit/test_fuzz_handlers.py): each case
starts from a message an honest member of the round in progress would send and applies one mutation,
a boundary value in a field chosen through the message's descriptor (tests/fuzz_cases.py), or a lie
with a meaning (another round, roster or shard, someone else's id, a stranger, a header that disagrees
with its payload, NaN values, a stream with bytes missing or to spare, an oversized message, a part sent
twice or after its shard was reduced), or is random bytes, an unsigned call or a replay."""

from __future__ import annotations

import random
import struct

import grpc

from peer._proto import peer_pb2 as pb
from peer.net import validate
from peer.net.allreduce import payload_digest
from tests.fuzz_cases import (
    BIG,
    DENIED,
    HAS,
    I64,
    INF,
    INVALID,
    NAN,
    OK,
    Case,
    World,
    code_in,
    dropped,
    field_case,
    not_accepted,
    strings,
)


# ---- the RPCs ------------------------------------------------------------------------------------
def nan_payload(rng: random.Random, payload: bytes) -> bytes:
    """`payload` (fp32) with a NaN or an infinity written over a few of its values."""
    out = bytearray(payload)
    for _ in range(rng.choice([1, 3])):
        i = 4 * rng.randrange(len(out) // 4)
        out[i:i + 4] = struct.pack("<f", rng.choice([NAN, INF, -INF]))
    return bytes(out)


def chunked(header: pb.ShardHeader, payload: bytes, size: int = 1 << 12) -> list[pb.ShardChunk]:
    first = [pb.ShardChunk(header=header, data=payload[:size])]
    return first + [pb.ShardChunk(data=payload[i:i + size]) for i in range(size, len(payload), size)]


def contribute(rng: random.Random, w: World) -> Case:
    m = rng.choice(w.members)
    payload = w.payload(m.peer_id, w.mine)
    h = w.header(m.peer_id, payload, w.mine)
    kind = rng.choice(["valid", "duplicate", "nan", "short", "long_stream", "short_stream", "sha", "numel",
                       "num_bytes", "codec", "round", "late", "roster", "shard", "backup", "other_id", "stranger",
                       "empty", "no_header", "repeated_header", "oversized", "field"])
    expect = not_accepted
    if kind == "late" and w.before is None:   # the first round has none before it
        kind = "valid"
    if kind == "valid":
        return Case("Contribute", kind, m, chunked(h, payload), lambda code, reply: "")
    if kind == "duplicate":   # the same part twice in a row: the second is never taken
        again = Case("Contribute", "duplicate", m, chunked(h, payload), code_in(HAS))
        return Case("Contribute", "valid", m, chunked(h, payload), lambda code, reply: "", then=[again])
    if kind == "nan":
        payload = nan_payload(rng, payload)
        h.sha256 = payload_digest(payload)   # the lie is not caught by the hash alone
        expect = dropped
    elif kind == "short":   # a shard of the wrong length, announced as such
        payload = payload[:-4 * rng.choice([1, 100])]
        h.num_bytes, h.numel, h.sha256 = len(payload), len(payload) // 4, payload_digest(payload)
    elif kind == "long_stream":
        return Case("Contribute", kind, m, chunked(h, payload) + [pb.ShardChunk(data=b"\0" * 64)], code_in(INVALID, HAS))
    elif kind == "short_stream":
        return Case("Contribute", kind, m, chunked(h, payload)[:-1], code_in(INVALID, HAS))
    elif kind == "sha":
        h.sha256 = payload_digest(payload + b"!")
    elif kind == "numel":
        h.numel += rng.choice([-1, 1, 10**9])
    elif kind == "num_bytes":
        h.num_bytes = rng.choice([0, h.num_bytes - 1, h.num_bytes + 1, I64])
    elif kind == "codec":
        h.codec = rng.choice(["int8", "fp16", "", "sparse:4096:64", "fp32 "])
    elif kind == "round":
        h.round = rng.choice([w.round - 1, w.round + 2, w.round + 10**6])
    elif kind == "late":   # an honest part of the round before, whose shard is reduced already
        payload = w.before.payload(m.peer_id, w.before.mine)
        return Case("Contribute", kind, m, chunked(w.before.header(m.peer_id, payload, w.before.mine), payload),
                    not_accepted)
    elif kind == "roster":
        h.roster_hash = rng.choice(["", "0" * 64, w.roster.hash[:-1] + "x"])
    elif kind == "shard":
        h.shard = rng.choice([w.theirs, 2, 2**31 - 1])
    elif kind == "backup":   # our shard's backup owner is the other owner; theirs is backed up here
        h.backup = True
        if rng.random() < 0.5:
            payload = w.payload(m.peer_id, w.theirs)
            h = w.header(m.peer_id, payload, w.theirs, backup=True)
            expect = lambda code, reply: ""   # noqa: E731 (a dead owner's shard is reduced again here)
    elif kind == "other_id":
        h.sender = rng.choice([x.peer_id for x in w.members if x is not m] + [w.core_id])
        expect = code_in(DENIED)
    elif kind == "stranger":
        m = rng.choice(w.strangers)
        h.sender = m.peer_id
    elif kind == "empty":
        return Case("Contribute", kind, m, [], code_in(INVALID))
    elif kind == "no_header":
        return Case("Contribute", kind, m, [pb.ShardChunk(data=payload)], code_in(INVALID))
    elif kind == "repeated_header":   # a second header rides on a later chunk: ignored, the data is the part
        chunks = chunked(h, payload)
        chunks[1].header.CopyFrom(h)
        return Case("Contribute", kind, m, chunks, lambda code, reply: "")
    elif kind == "oversized":
        return Case("Contribute", kind, m, [pb.ShardChunk(header=h, data=b"\0" * BIG)],
                    code_in(grpc.StatusCode.RESOURCE_EXHAUSTED), big=True)
    elif kind == "field":
        c = field_case(rng, "Contribute", m, h, w)
        c.request = chunked(h, payload)   # a header still valid may be accepted: the round's mean checks its part
        return c
    return Case("Contribute", kind, m, chunked(h, payload), expect, timeout_s=1.5)


def join(rng: random.Random, w: World) -> Case:
    m = rng.choice(w.members)
    req = pb.JoinRequest(run_id=w.run_id, round=w.round, spec_hash=w.spec_hash, skip=[],
                         member=pb.Member(peer_id=m.peer_id, weight=10.0, samples=40, client_mode=True,
                                          carried_round=-1))
    kind = rng.choice(["valid", "next_round", "no_record", "forged", "other_id", "run", "spec", "oversized", "field"])
    rejected = lambda code, reply: "" if code == OK and reply.status == pb.JoinReply.REJECTED else "not rejected"  # noqa: E731
    if kind == "next_round":
        req.round = w.round + 1
        return Case("Join", kind, m, req, timeout_s=1.0)
    if kind == "no_record":   # a fresh identity with no signed record in the DHT
        s = rng.choice(w.strangers)
        req.member.peer_id = s.peer_id
        return Case("Join", kind, s, req, rejected)
    if kind == "forged":      # 10^9 weight, 10^15 samples, backed by nothing it published
        req.member.weight, req.member.samples = 1e9, 10**15
        return Case("Join", kind, m, req, rejected)
    if kind == "other_id":
        req.member.peer_id = w.members[0].peer_id if m is not w.members[0] else w.members[1].peer_id
        return Case("Join", kind, m, req, code_in(DENIED))
    if kind in ("run", "spec"):   # another run's, or a string too long for any (INVALID_ARGUMENT)
        setattr(req, "run_id" if kind == "run" else "spec_hash", strings(rng, w) + "?")
        return Case("Join", kind, m, req, code_in(grpc.StatusCode.FAILED_PRECONDITION, INVALID))
    if kind == "oversized":
        req.member.address = "a" * BIG
        return Case("Join", kind, m, req, code_in(grpc.StatusCode.RESOURCE_EXHAUSTED), big=True)
    if kind == "field":
        return field_case(rng, "Join", m, req, w, timeout_s=1.0)
    return Case("Join", kind, m, req, lambda code, reply: "" if code != OK or reply.status != pb.JoinReply.OK
                else "admitted to a closed round", timeout_s=1.0)


def get_shard(rng: random.Random, w: World) -> Case:
    m = rng.choice(w.members)
    req = pb.ShardRequest(round=w.round, roster_hash=w.roster.hash, shard=w.mine, requester=m.peer_id, wait_s=0.3)
    kind = rng.choice(["valid", "nan_wait", "shard", "round", "roster", "backup", "header_only", "other_id", "field"])
    if kind == "nan_wait":   # issue 10's known bug: a NaN wait reached asyncio.wait_for
        req.wait_s = rng.choice([NAN, INF, -INF, -1.0])
        return Case("GetShard", kind, m, req, code_in(INVALID))
    if kind == "shard":
        req.shard = rng.choice([w.theirs, 2, -1, 2**31 - 1])
    elif kind == "round":
        req.round = rng.choice([w.round - 1, w.round + 1, w.round + 10**6, -1])
    elif kind == "roster":
        req.roster_hash = rng.choice(["", w.roster.hash[::-1]])
    elif kind in ("backup", "header_only"):
        setattr(req, kind, True)
        req.shard = rng.choice([w.mine, w.theirs])
    elif kind == "other_id":
        req.requester = w.core_id
        return Case("GetShard", kind, m, req, code_in(DENIED))
    elif kind == "field":
        return field_case(rng, "GetShard", m, req, w, timeout_s=1.0)
    return Case("GetShard", kind, m, req, timeout_s=1.0)


def commit(rng: random.Random, w: World) -> Case:
    m = rng.choice(w.members)
    req = pb.CommitRequest(round=w.round, roster_hash=w.roster.hash, peer_id=m.peer_id, ok=True,
                           shard_sha256=["0" * 64, "1" * 64])
    kind = rng.choice(["valid", "stranger", "other_id", "roster", "round", "unreachable", "field"])
    if kind == "stranger":
        s = rng.choice(w.strangers)
        req.peer_id = s.peer_id
        return Case("Commit", kind, s, req, code_in(DENIED))
    if kind == "other_id":
        req.peer_id = w.core_id
        return Case("Commit", kind, m, req, code_in(DENIED))
    if kind == "roster":
        req.roster_hash = rng.choice(["", "f" * 64])
        return Case("Commit", kind, m, req, code_in(grpc.StatusCode.FAILED_PRECONDITION))
    if kind == "round":
        req.round = rng.choice([w.round - 1, w.round + 2, w.round + 10**6])
        return Case("Commit", kind, m, req, code_in(grpc.StatusCode.FAILED_PRECONDITION))
    if kind == "unreachable":   # a member names everyone else unreachable: it speaks only for itself
        req.unreachable.extend([x.peer_id for x in w.members if x is not m] + [w.core_id])
    elif kind == "field":
        return field_case(rng, "Commit", m, req, w, timeout_s=0.5)
    return Case("Commit", kind, m, req, timeout_s=0.5)   # the decision waits for every member: a long poll


def get_state(rng: random.Random, w: World) -> Case:
    m = rng.choice(w.members + w.strangers)
    req = pb.StateRequest(min_round=0, requester=m.peer_id)
    kind = rng.choice(["valid", "range", "offset", "length", "sha", "min_round", "field"])
    if kind == "range":
        req.offset, req.length = rng.choice([(0, 4), (8, 4096), (4, 0)])
        return Case("GetState", kind, m, req, code_in(OK))
    if kind in ("offset", "length"):
        setattr(req, kind, rng.choice([-1, 10**12, I64, -I64 - 1]))
        return Case("GetState", kind, m, req, code_in(INVALID))
    if kind == "sha":
        req.sha256 = rng.choice(["0" * 64, w.state_sha[::-1], "x"])
        return Case("GetState", kind, m, req, code_in(grpc.StatusCode.FAILED_PRECONDITION))
    if kind == "min_round":
        req.min_round = rng.choice([w.round + 5, I64])
        return Case("GetState", kind, m, req, code_in(grpc.StatusCode.FAILED_PRECONDITION))
    if kind == "field":
        return field_case(rng, "GetState", m, req, w)
    return Case("GetState", kind, m, req, code_in(OK))


def get_updates(rng: random.Random, w: World) -> Case:
    m = rng.choice(w.members + w.strangers)
    first, last = w.updates
    lo = rng.randint(first, last)
    req = pb.UpdatesRequest(from_round=lo, to_round=rng.randint(lo + 1, last + 1))
    kind = rng.choice(["valid", "backwards", "far", "extreme", "field"])
    if kind == "backwards":
        req.to_round = req.from_round - rng.choice([0, 1, 10**9])
        return Case("GetUpdates", kind, m, req, code_in(INVALID))
    if kind == "far":
        req.from_round, req.to_round = rng.choice([(0, I64), (last + 1, last + 3), (first - 3, last)])
        return Case("GetUpdates", kind, m, req, code_in(grpc.StatusCode.FAILED_PRECONDITION, INVALID))
    if kind == "extreme":
        req.from_round, req.to_round = -I64 - 1, I64
        return Case("GetUpdates", kind, m, req, code_in(INVALID))
    if kind == "field":
        return field_case(rng, "GetUpdates", m, req, w)
    return Case("GetUpdates", kind, m, req, code_in(OK))


def progress(rng: random.Random, w: World) -> Case:
    m = rng.choice(w.members)
    req = pb.ProgressRequest(run_id=w.run_id, spec_hash=w.spec_hash, round=w.round, peer_id=m.peer_id,
                             steps=rng.randint(0, 8), rate=rng.choice([0.0, 5.0, 50.0]))
    kind = rng.choice(["valid", "forged_steps", "bad_steps", "bad_rate", "other_id", "run", "round", "field"])
    if kind == "forged_steps":   # huge but within the field's range: the tally caps what it counts
        req.steps = rng.choice([10**6, validate.MAX_STEPS])
    elif kind == "bad_steps":
        req.steps = rng.choice([-1, validate.MAX_STEPS + 1, I64, -I64 - 1])
        return Case("Progress", kind, m, req, code_in(INVALID))
    elif kind == "bad_rate":
        req.rate = rng.choice([NAN, INF, -INF, -1.0, 1e7])
        return Case("Progress", kind, m, req, code_in(INVALID))
    elif kind == "other_id":
        req.peer_id = w.core_id
        return Case("Progress", kind, m, req, code_in(DENIED))
    elif kind == "run":
        req.spec_hash = strings(rng, w) + "?"
        return Case("Progress", kind, m, req, code_in(grpc.StatusCode.FAILED_PRECONDITION, INVALID))
    elif kind == "round":
        req.round = rng.choice([w.round - 1, w.round + 1, w.round + 10**6])
    elif kind == "field":
        return field_case(rng, "Progress", m, req, w)
    return Case("Progress", kind, m, req)


def dial_back(rng: random.Random, w: World) -> Case:
    m = rng.choice(w.members)
    req = pb.DialBackRequest(peer_id=m.peer_id, grpc_address="127.0.0.1:1", timeout_s=0.2)
    kind = rng.choice(["valid", "bad_timeout", "addresses", "not_caller", "other_id", "field"])
    if kind == "bad_timeout":
        req.timeout_s = rng.choice([NAN, INF, -INF, -0.5])
        return Case("DialBack", kind, m, req, code_in(INVALID))
    if kind == "addresses":
        req.tcp_addresses.extend(rng.choice([["x"], ["1.2.3.4:0"], ["127.0.0.1:2"] * 4, ["[::1]:99999"]]))
        req.grpc_address = rng.choice(["", "127.0.0.1:1", "no port"])
    elif kind == "not_caller":   # the callee dials only the host the call came from
        req.grpc_address = "10.255.255.1:7000"
    elif kind == "other_id":
        req.peer_id = w.core_id
        return Case("DialBack", kind, m, req, code_in(DENIED))
    elif kind == "field":
        return field_case(rng, "DialBack", m, req, w)
    return Case("DialBack", kind, m, req)


def link_test(rng: random.Random, w: World) -> Case:
    m = rng.choice(w.members + w.strangers)
    kind = rng.choice(["valid", "empty", "oversized"])
    if kind == "empty":
        return Case("LinkTest", kind, m, [])
    if kind == "oversized":
        return Case("LinkTest", kind, m, [pb.LinkChunk(data=b"\0" * BIG)], code_in(grpc.StatusCode.RESOURCE_EXHAUSTED),
                    big=True)
    return Case("LinkTest", kind, m, [pb.LinkChunk(data=rng.randbytes(rng.choice([0, 100, 65536])))
                                      for _ in range(rng.randint(1, 4))], code_in(OK, grpc.StatusCode.RESOURCE_EXHAUSTED))


def health(rng: random.Random, w: World) -> Case:
    return Case("Health", "valid", rng.choice(w.members + w.strangers), pb.HealthRequest(), code_in(OK))


RPCS = {"Join": join, "Contribute": contribute, "GetShard": get_shard, "Commit": commit, "GetState": get_state,
        "Health": health, "GetUpdates": get_updates, "Progress": progress, "DialBack": dial_back,
        "LinkTest": link_test}
STREAMING_IN = ("Contribute", "LinkTest")
STREAMING_OUT = ("GetShard", "GetState", "GetUpdates")


def raw(rng: random.Random, w: World) -> Case:
    """Random bytes as the request of a random method (signed: they reach deserialization and the
    handler), or a well-formed call without a signature, or a replay of a signed one."""
    rpc = rng.choice(sorted(RPCS))
    kind = rng.choice(["bytes", "bytes", "unsigned", "replay"])
    body = rng.randbytes(rng.choice([0, 1, 16, 300, 5000]))
    if kind == "bytes":
        return Case(rpc, "random_bytes", rng.choice(w.members + w.strangers), body, timeout_s=1.0, raw="bytes")
    return Case(rpc, kind, rng.choice(w.members), b"", code_in(grpc.StatusCode.UNAUTHENTICATED), raw=kind)


def generate(rng: random.Random, w: World) -> Case:
    """One case: a structured mutation of a random RPC's request (9 in 10), or raw()."""
    if rng.random() < 0.1:
        return raw(rng, w)
    return RPCS[rng.choice(sorted(RPCS))](rng, w)
