"""The leader's group: it waits for the expected peers through the join window, and a peer
still missing after it is asked (probed) before the group closes without it."""

from __future__ import annotations

import asyncio
import time

from peer._proto import peer_pb2 as pb
from peer.net.round import LeaderGroup, decide, make_roster


def member(pid: str, weight: float = 1.0) -> pb.Member:
    return pb.Member(peer_id=pid, address=f"127.0.0.1:{len(pid)}", weight=weight, samples=4)


def test_closes_at_once_when_every_expected_peer_joined():
    async def body():
        g = LeaderGroup(3, "a", "int8", 10)
        g.add(member("a"))
        assert not g.maybe_close({"a", "b"}, 5.0)
        g.add(member("b"))
        assert g.maybe_close({"a", "b"}, 5.0)
        assert [m.peer_id for m in g.roster.result().members] == ["a", "b"]
    asyncio.run(body())


def test_missing_peer_is_probed_before_the_group_closes_without_it():
    async def body():
        g = LeaderGroup(3, "a", "int8", 10)
        g.add(member("a"))
        g.first_join_at = time.monotonic() - 10  # the window is over
        assert g.window_over({"a", "b"}, 1.0) == {"b"}
        assert not g.maybe_close({"a", "b"}, 1.0), "closed before asking the missing peer"
        g.probing = True
        assert not g.maybe_close({"a", "b"}, 1.0)
        g.probing, g.probed = False, True
        assert g.maybe_close({"a", "b"}, 1.0)
        assert [m.peer_id for m in g.roster.result().members] == ["a"]
    asyncio.run(body())


def test_decision_applies_only_with_equal_hashes_from_ok_reports():
    roster = make_roster(1, "a", [member("a"), member("b")], "int8", 10)
    ok = {p: pb.CommitRequest(round=1, peer_id=p, ok=True, shard_sha256=["x", "y"]) for p in "ab"}
    assert decide(roster, ok).apply
    bad = dict(ok, b=pb.CommitRequest(round=1, peer_id="b", ok=True, shard_sha256=["x", "z"]))
    assert not decide(roster, bad).apply
    failed = dict(ok, b=pb.CommitRequest(round=1, peer_id="b", ok=False, reason="shard 1: gone"))
    assert "gone" in decide(roster, failed).reason
    partial = decide(roster, {"a": ok["a"]})
    assert partial.apply and "no report from" in partial.reason


def test_decision_does_not_wait_for_a_member_the_others_could_not_reach():
    async def body():
        def group(leader_names_c: bool) -> LeaderGroup:
            g = LeaderGroup(1, "a", "int8", 10)
            for p in "abcd":
                g.add(member(p))
            assert g.maybe_close({"a", "b", "c", "d"}, 5.0)
            g.add_report(pb.CommitRequest(peer_id="a", unreachable=["c"] if leader_names_c else [], **report))
            return g

        report = dict(round=1, ok=True, shard_sha256=["x", "y", "z"])
        g = group(leader_names_c=False)
        g.add_report(pb.CommitRequest(peer_id="b", unreachable=["c", "d"], **report))
        assert not g.maybe_decide(60.0), "one member's report speaks only for itself: c and d are still waited for"
        g.add_report(pb.CommitRequest(peer_id="d", unreachable=["c"], **report))
        assert g.maybe_decide(60.0), "two reports name c: it is not waited for"
        d = g.decision.result()
        assert d.apply and list(d.committed) == ["a", "b", "d"] and list(d.shard_sha256) == ["x", "y", "z"]

        g = group(leader_names_c=True)   # the leader's own report is enough
        g.add_report(pb.CommitRequest(peer_id="b", **report))
        g.add_report(pb.CommitRequest(peer_id="d", **report))
        assert g.maybe_decide(60.0) and list(g.decision.result().committed) == ["a", "b", "d"]
    asyncio.run(body())
