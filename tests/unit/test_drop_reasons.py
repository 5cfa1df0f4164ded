"""Why a roster member was dropped from an applied round, as one member sees it: the leader's
decision carries who was reported unreachable, and `drop_reasons` names one fixed word per
dropped peer from the shard headers, our own failed calls and the decision."""

from __future__ import annotations

from peer._proto import peer_pb2 as pb
from peer.net.round import DROP_REASONS, decide, drop_reasons, make_roster

IDS = ["peer-a", "peer-b", "peer-c", "peer-d"]


def roster(ids=IDS, clients=()) -> pb.Roster:
    members = [pb.Member(peer_id=p, address="" if p in clients else f"127.0.0.1:{i + 1}", weight=1.0, samples=4,
                         client_mode=p in clients) for i, p in enumerate(ids)]
    return make_roster(5, ids[0], members, "fp32", 400)


def header(r: pb.Roster, shard: int, contributors, backup: bool = False) -> pb.ShardHeader:
    return pb.ShardHeader(round=r.round, roster_hash=r.hash, shard=shard, contributors=sorted(contributors),
                          weights=[1.0] * len(contributors), backup=backup)


def report(r: pb.Roster, peer: str, unreachable=()) -> pb.CommitRequest:
    return pb.CommitRequest(round=r.round, roster_hash=r.hash, peer_id=peer, ok=True, shard_sha256=["x"],
                            unreachable=sorted(unreachable))


def test_the_decision_lists_every_peer_any_report_found_unreachable():
    r = roster()
    reports = {p: report(r, p, ["peer-d"] if p == "peer-b" else []) for p in IDS[:3]}
    reports["peer-c"] = report(r, "peer-c", ["peer-d", "peer-a"])
    d = decide(r, reports)
    assert d.apply and list(d.unreachable) == ["peer-a", "peer-d"]
    assert list(d.committed) == ["peer-a", "peer-b", "peer-c"] and d.reason == "no report from peer-d"


def test_no_drop_no_reason():
    r = roster()
    headers = [header(r, j, IDS) for j in range(4)]
    assert drop_reasons(r, headers, "peer-a", set(), decide(r, {p: report(r, p) for p in IDS})) == {}


def test_a_dead_owner_we_could_not_reach_is_unreachable_for_us_and_reported_for_the_others():
    """peer-d died after Join: its shard was redone by the backup owner without it, every owner
    reduced without its part, and it never reported."""
    r = roster()
    alive = IDS[:3]
    headers = [header(r, j, alive) for j in range(3)] + [header(r, 3, alive, backup=True)]
    reports = {p: report(r, p, ["peer-d"] if p == "peer-b" else []) for p in alive}
    decision = decide(r, reports)
    assert drop_reasons(r, headers, "peer-b", {"peer-d"}, decision) == {"peer-d": "unreachable"}
    assert drop_reasons(r, headers, "peer-a", set(), decision) == {"peer-d": "reported_unreachable"}
    quiet = decide(r, {p: report(r, p) for p in alive})   # nobody's call to it failed: it only left
    assert drop_reasons(r, headers, "peer-a", set(), quiet) == {"peer-d": "no_report"}


def test_an_owner_whose_shard_was_redone_without_it_but_who_reported():
    r = roster()
    headers = [header(r, 0, IDS), header(r, 1, IDS), header(r, 2, [p for p in IDS if p != "peer-c"], backup=True),
               header(r, 3, IDS)]
    decision = decide(r, {p: report(r, p) for p in IDS})
    assert drop_reasons(r, headers, "peer-a", set(), decision) == {"peer-c": "backup"}


def test_a_part_that_did_not_reach_an_owner():
    """A client-mode member whose part reached one owner too late: the others say not_received;
    a member whose own send failed says send_failed for itself."""
    r = roster(clients=("peer-d",))
    assert list(r.owners) == IDS[:3]
    headers = [header(r, 0, IDS), header(r, 1, IDS[:3]), header(r, 2, IDS)]
    decision = decide(r, {p: report(r, p) for p in IDS})
    assert drop_reasons(r, headers, "peer-a", set(), decision) == {"peer-d": "not_received"}
    assert drop_reasons(r, headers, "peer-d", {"peer-b"}, decision) == {"peer-d": "send_failed"}


def test_reasons_are_short_fixed_label_values():
    for word in DROP_REASONS:
        assert word.isidentifier() and word.islower() and len(word) <= 24
