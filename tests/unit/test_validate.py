"""Validation of claims: caps on a member's weight and samples against the group's lower median,
a joiner's claimed work against what it published, the leader's count of Progress reports, and
the checks a member makes of a roster before it uses it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from peer._proto import peer_pb2 as pb
from peer.net import validate
from peer.net.round import Tally, make_roster
from peer.net.validate import CLAIM_CAP, UNGRANTED_STEPS, cap_claims, join_claim


def m(pid: str, weight: float, samples: int, carried: float = 0.0) -> pb.Member:
    return pb.Member(peer_id=pid, address=f"{pid}:1", weight=weight, samples=samples, carried_weight=carried,
                     carried_round=0 if carried else -1)


def test_one_claim_counts_at_most_cap_times_the_lower_median():
    group = cap_claims([m("a", 10, 40), m("b", 12, 48), m("liar", 1e9, 10**15, carried=5e8)])
    liar = group[2]
    assert liar.weight == CLAIM_CAP * 12 and liar.samples == CLAIM_CAP * 48
    assert liar.carried_weight == pytest.approx(liar.weight / 2), "the carried part keeps its share"
    assert [g.weight for g in group[:2]] == [10, 12], "honest claims untouched"
    two = cap_claims([m("a", 10, 40), m("liar", 1e9, 10**15)])
    assert two[1].weight == CLAIM_CAP * 10, "with two members the smaller claim is the median"
    assert cap_claims([m("solo", 1e9, 10)])[0].weight == 1e9, "alone, nothing to compare with"
    assert validate.capped(group) and not validate.capped([m("a", 10, 40), m("b", 1e9, 40)])
    mixed = cap_claims([m("s1", 5, 20), m("s2", 5, 20), m("f1", 40, 160), m("f2", 40, 160)])
    assert [x.weight for x in mixed] == [5, 5, 40, 40], "a fast half is not capped by a slow half"


def test_the_roster_carries_capped_claims_and_members_refuse_an_uncapped_one():
    members = [m("a", 10, 40), m("b", 12, 48), m("liar", 1e9, 10**15)]
    roster = make_roster(3, "a", members, "int8", 100)
    assert max(x.weight for x in roster.members) == CLAIM_CAP * 12
    assert members[2].weight == 1e9, "the joiner's own message is not changed"
    assert validate.roster(roster, 100, "int8", "a") == ""
    bad = pb.Roster.FromString(roster.SerializeToString())
    bad.members[2].weight = 1e9
    assert "exceed the caps" in validate.roster(bad, 100, "int8", "a")
    assert "not among its members" in validate.roster(roster, 100, "int8", "z")
    assert "do not cover" in validate.roster(roster, 101, "int8", "a")
    assert "not the run's" in validate.roster(roster, 100, "fp32", "a")


def record(round_: int, steps: int, samples: int, rate: float = 0.0, addr: str = "j:1"):
    return SimpleNamespace(round=round_, steps=steps, samples=samples, addr=addr, spec="s",
                           steps_now=lambda: steps + rate)


def test_a_joiners_claim_must_be_backed_by_what_it_published():
    join = m("j", 20, 80)
    assert "no fresh signed progress record" in join_claim(join, 5, None, None, None, "steps")
    assert join_claim(join, 5, record(5, 20, 80), None, None, "steps") == ""
    assert join_claim(join, 5, record(5, 2, 8), (19, 50.0, 0.0), 24, "steps") == "", "the leader's tally backs it"
    assert "claims 20 steps, but published 2" in join_claim(join, 5, record(5, 2, 8), None, None, "steps")
    assert "published" in join_claim(m("j", 20, 10**15), 5, record(5, 20, 80), None, None, "steps")
    assert "every contribution weighs 1" in join_claim(m("j", 5, 80), 5, record(5, 20, 80), None, None, "equal")
    assert "is not the one its record gives" in join_claim(join, 5, record(5, 20, 80, addr="k:1"), None, None, "steps")


def test_a_progress_report_counts_at_most_a_little_beyond_what_was_allowed():
    t = Tally(100)
    t.report("honest", 0, 100.0, 0.0)
    t.report("liar", 10**9, 100.0, 0.0)
    assert t.reports["liar"][0] <= UNGRANTED_STEPS, "no member outbids the round by a report"
    allowed, stop, _ = t.report("honest", 10, 100.0, 0.1)
    assert not stop and allowed > 10, "the honest member still gets steps"


NAN, INF = float("nan"), float("inf")
BAD_NUMBERS = [
    (pb.ShardRequest(wait_s=NAN), "ShardRequest.wait_s"), (pb.ShardRequest(wait_s=INF), "ShardRequest.wait_s"),
    (pb.ShardRequest(wait_s=-1.0), "ShardRequest.wait_s"), (pb.ShardRequest(shard=-1), "ShardRequest.shard"),
    (pb.ShardRequest(round=-5), "ShardRequest.round"),
    (pb.DialBackRequest(timeout_s=NAN), "DialBackRequest.timeout_s"),
    (pb.DialBackRequest(timeout_s=-INF), "DialBackRequest.timeout_s"),
    (pb.ProgressRequest(rate=NAN), "ProgressRequest.rate"), (pb.ProgressRequest(rate=2e6), "ProgressRequest.rate"),
    (pb.ProgressRequest(steps=-1), "ProgressRequest.steps"),
    (pb.ProgressRequest(steps=2**63 - 1), "ProgressRequest.steps"),
    (pb.JoinRequest(member=pb.Member(weight=NAN)), "JoinRequest.member.weight"),
    (pb.JoinRequest(member=pb.Member(weight=1, samples=-1)), "JoinRequest.member.samples"),
    (pb.JoinRequest(member=pb.Member(weight=1, carried_weight=INF)), "JoinRequest.member.carried_weight"),
    (pb.JoinRequest(member=pb.Member(weight=1, upload_bps=NAN)), "JoinRequest.member.upload_bps"),
    (pb.JoinRequest(member=pb.Member(weight=1, carried_round=-2)), "JoinRequest.member.carried_round"),
    (pb.JoinRequest(skip=["x"] * (validate.MAX_LISTED + 1)), "JoinRequest.len(skip)"),
    (pb.StateRequest(offset=-1), "StateRequest.offset"), (pb.StateRequest(length=-8), "StateRequest.length"),
    (pb.UpdatesRequest(from_round=3, to_round=3), "UpdatesRequest.to_round"),
    (pb.UpdatesRequest(from_round=-1, to_round=3), "UpdatesRequest.from_round"),
    (pb.CommitRequest(round=-1), "CommitRequest.round"),
    (pb.ShardHeader(numel=-4), "ShardHeader.numel"), (pb.ShardHeader(num_bytes=-4), "ShardHeader.num_bytes"),
    (pb.ShardHeader(weights=[1.0, NAN]), "ShardHeader.weights[]"),
    (pb.ShardHeader(total_weight=-INF), "ShardHeader.total_weight"),
]


@pytest.mark.parametrize("message, field", BAD_NUMBERS, ids=[f for _, f in BAD_NUMBERS])
def test_a_number_out_of_its_range_is_refused_naming_its_field(message, field):
    import grpc

    from peer.net.client import Reject

    with pytest.raises(Reject) as e:
        validate.numbers(message)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and str(e.value).startswith(field + " is "), str(e.value)


def test_the_numbers_honest_peers_send_pass():
    for message in (pb.ShardRequest(round=3, shard=1, wait_s=12.5), pb.DialBackRequest(timeout_s=0.0),
                    pb.ProgressRequest(round=0, steps=10, rate=3.5), pb.StateRequest(min_round=-1, offset=8),
                    pb.JoinRequest(round=2, member=pb.Member(weight=4, samples=16, carried_round=-1)),
                    pb.UpdatesRequest(from_round=2, to_round=3), pb.ShardHeader(weights=[1.0, 2.0], total_weight=3.0),
                    pb.HealthRequest(), pb.LinkChunk()):
        validate.numbers(message)


def test_over_grpc_a_nan_wait_and_a_headless_contribution_are_refused_before_any_handler():
    import asyncio

    import grpc

    from peer.config import PeerConfig
    from peer.net.core import NetCore
    from peer.net.server import start_server
    from tests.fixtures import channels, identity

    async def main():
        core = NetCore(None, PeerConfig(run_id="val"), identity())  # type: ignore[arg-type]
        server, port = await start_server(core, "127.0.0.1", 0)
        me = identity()
        client = channels(me)
        stub = client.stub(f"127.0.0.1:{port}")
        try:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await anext(aiter(stub.GetShard(pb.ShardRequest(requester=me.peer_id, wait_s=NAN), timeout=5)))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "ShardRequest.wait_s is nan" in e.value.details()

            async def headless():
                yield pb.ShardChunk(data=b"x" * 16)

            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.Contribute(headless(), timeout=5)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "carries no header" in e.value.details()
        finally:
            await client.close()
            await server.stop(None)

    asyncio.run(main())


def test_a_string_field_longer_than_max_text_is_refused_naming_it():
    import grpc

    from peer.net.client import Reject

    for message, field in ((pb.JoinRequest(run_id="r" * (validate.MAX_TEXT + 1)), "JoinRequest.run_id"),
                           (pb.JoinRequest(member=pb.Member(address="a" * 10**5)), "Member.address"),
                           (pb.CommitRequest(unreachable=["p", "q" * 600]), "CommitRequest.unreachable")):
        with pytest.raises(Reject) as e:
            validate.texts(message)
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and str(e.value).startswith(field), str(e.value)
    validate.texts(pb.CommitRequest(reason="why " * 10_000, peer_id="p" * validate.MAX_TEXT))
