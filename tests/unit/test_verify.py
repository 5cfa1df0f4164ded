"""Lying owners (peer.net.verify): the comparison of a shard's two reductions and whom a mismatch
names, the suspicion that follows, and who may own shards (--trusted-owners, suspected reducers)."""

from __future__ import annotations

import asyncio

import pytest

from peer._proto import peer_pb2 as pb
from peer.config import ConfigError, RunSpec, validate_spec, verifies_shards
from peer.net import validate
from peer.net.round import LeaderGroup, make_roster
from peer.net.verify import SUSPECT_ROUNDS, OwnerRule, Suspects, compare
from tests.fixtures import identity

IDS = sorted(identity().peer_id for _ in range(4))


def header(sha: str, parts: dict[str, str], weights: list[float] | None = None) -> pb.ShardHeader:
    ids = sorted(parts)
    return pb.ShardHeader(sha256=sha, contributors=ids, weights=weights or [1.0] * len(ids),
                          parts_sha256=[parts[p] for p in ids])


def test_equal_reductions_agree_and_a_different_result_of_the_same_parts_names_both_reducers():
    me, owner, backup, other = IDS
    parts = {me: "m", owner: "o", backup: "b", other: "x"}
    assert compare(owner, header("r", parts), backup, header("r", parts), me, "m") is None
    m = compare(owner, header("r", parts), backup, header("LIE", parts), me, "m")
    assert m is not None and set(m.reducers) == {owner, backup} and not m.contributors
    m = compare(owner, header("r", parts, [1, 1, 1, 1]), backup, header("r", parts, [1, 9, 1, 1]), me, "m")
    assert m is not None and set(m.reducers) == {owner, backup}, "weights differ: a reducer lied about them"


def test_our_part_misquoted_or_dropped_names_that_reducer_alone():
    me, owner, backup, other = IDS
    honest = {me: "m", owner: "o", backup: "b", other: "x"}
    m = compare(owner, header("r1", {**honest, me: "forged"}), backup, header("r2", honest), me, "m")
    assert m is not None and m.reducers == (owner,)
    dropped = {p: s for p, s in honest.items() if p != me}
    m = compare(owner, header("r1", honest), backup, header("r2", dropped), me, "m")
    assert m is not None and m.reducers == (backup,)
    # our send to the backup failed: we cannot vouch for our part, so nobody is named for it
    m = compare(owner, header("r1", honest), backup, header("r2", dropped), me, "")
    assert m is not None and not m.reducers and m.contributors == ()


def test_a_contributor_that_sent_the_reducers_different_parts_or_one_none_is_named():
    me, owner, backup, other = IDS
    a = {me: "m", owner: "o", backup: "b", other: "x1"}
    m = compare(owner, header("r1", a), backup, header("r2", {**a, other: "x2"}), me, "m")
    assert m is not None and m.contributors == (other,) and not m.reducers
    m = compare(owner, header("r1", a), backup, header("r2", {p: s for p, s in a.items() if p != other}), me, "m")
    assert m is not None and m.contributors == (other,)


def test_suspicion_doubles_with_each_mismatch_and_is_counted_once_per_shard():
    s = Suspects()
    liar, partner = IDS[:2]
    s.add(3, 0, compare(liar, header("a", {liar: "x"}), partner, header("b", {liar: "x"}), IDS[3], ""))
    s.add(3, 0, compare(liar, header("a", {liar: "x"}), partner, header("b", {liar: "x"}), IDS[2], ""))
    assert s.reducers(3 + SUSPECT_ROUNDS) == {liar, partner} and not s.reducers(4 + SUSPECT_ROUNDS)
    assert s.counts[liar] == 1, "the same shard of the same round counted twice"
    s.add(20, 1, compare(liar, header("a", {liar: "x"}), IDS[2], header("b", {liar: "x"}), IDS[3], ""))
    assert s.counts[liar] == 2 and s.reducers(20 + SUSPECT_ROUNDS) == {liar, IDS[2]}
    assert s.reducers(20 + 2 * SUSPECT_ROUNDS) == {liar}, "a second suspicion lasts twice as long"
    assert s.contributors(21) == set()


def member(pid: str, weight: float = 1.0) -> pb.Member:
    return pb.Member(peer_id=pid, address="127.0.0.1:1", weight=weight, samples=4, upload_bps=1e8)


def test_only_trusted_members_own_shards_and_members_refuse_a_roster_that_breaks_the_rule():
    trusted = IDS[:2]
    rule = OwnerRule(trusted=frozenset(trusted))
    r = make_roster(1, IDS[0], [member(p) for p in IDS], "fp32", 1 << 16, rule)
    assert sorted(r.owners) == trusted
    assert validate.roster(r, 1 << 16, "fp32", IDS[3], trusted) == ""
    anyone = make_roster(1, IDS[0], [member(p) for p in IDS], "fp32", 1 << 16)
    assert "trusted-owners" in validate.roster(anyone, 1 << 16, "fp32", IDS[3], trusted)


def test_suspected_reducers_own_nothing_while_two_others_can_verify():
    rule = OwnerRule(avoid=frozenset(IDS[:2]), verify=True)
    r = make_roster(1, IDS[0], [member(p) for p in IDS], "fp32", 1 << 16, rule)
    assert sorted(r.owners) == IDS[2:]
    rule = OwnerRule(avoid=frozenset(IDS[:3]), verify=True)   # one left could not be verified: everyone owns
    assert sorted(make_roster(1, IDS[0], [member(p) for p in IDS], "fp32", 1 << 16, rule).owners) == IDS


def test_a_group_without_a_trusted_owner_closes_without_a_roster():
    async def body():
        g = LeaderGroup(2, IDS[2], "fp32", 1 << 16, OwnerRule(trusted=frozenset(IDS[:1])))
        for p in IDS[2:]:
            g.add(member(p))
        assert g.maybe_close(set(IDS[2:]), 5.0)
        with pytest.raises(RuntimeError, match="no trusted owner"):
            g.roster.result()
    asyncio.run(body())


def test_the_spec_checks_trusted_owners_and_verification_follows_the_aggregator():
    assert not verifies_shards(RunSpec())
    assert verifies_shards(RunSpec(aggregator="trimmed-mean"))
    assert not verifies_shards(RunSpec(aggregator="trimmed-mean", trusted_owners=IDS[0]))
    assert verifies_shards(RunSpec(verify_shards="on"))
    validate_spec(RunSpec(trusted_owners=",".join(IDS[:2])))
    for bad in (IDS[0] + ", " + IDS[1], "not-an-id", f"{IDS[0]},{IDS[0]}", IDS[0] + ","):
        with pytest.raises(ConfigError, match="trusted-owners"):
            validate_spec(RunSpec(trusted_owners=bad))
    with pytest.raises(ConfigError, match="verify-shards"):
        validate_spec(RunSpec(verify_shards="yes"))
