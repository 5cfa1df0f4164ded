"""A private run's records (peer.records member proofs) in a real DHT: a member's record is in a
private peer's view; a stranger's (signed, but without a proof) and one of a run with another secret
are not, are counted as skipped in the swarm view, and are neither waited for as members nor picked
as leaders, even for a round they would lead; a stranger's earlier spec does not become the run's.
A public peer reading the same DHT sees all of them (so the checks above can fail)."""

from __future__ import annotations

import asyncio

import pytest
from hivemind.utils import get_dht_time

from peer import records, swarmview
from peer.config import PeerConfig, RunSpec
from peer.dht import create_dht
from peer.net import swarm
from peer.net.auth import derived_key
from peer.net.core import NetCore
from peer.net.round import leader_rank
from tests.fixtures import identity, store_as

pytestmark = pytest.mark.timeout(120)
RUN, SECRET = "priv", "a-long-run-secret-0123456789"
KEY, OTHER_KEY = derived_key(SECRET, "member"), derived_key("another-secret-9876543210", "member")
SPEC = RunSpec(model="tiny")


@pytest.fixture(scope="module")
def dht():
    node = create_dht(initial_peers=[], host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    yield node
    node.shutdown()


def record(peer_id: str, round_: int) -> dict:
    return swarm.PeerRecord(peer_id, "127.0.0.1:9", round_, 5, 20, 1.0, True, False, round_, SPEC.hash(),
                            get_dht_time(), swarm.TRAIN).to_value()


def publish(dht, who, key: bytes, value: dict, dht_key: str) -> None:
    """`who`'s signed record, sealed with `key` (b"": as a peer of no private run writes it)."""
    assert store_as(dht, who, dht_key, records.sealed(key, dht_key, who.peer_id, value))


def round_led_by(ids: list[str], first: str) -> int:
    """A round whose best leader candidate among `ids` is `first`."""
    return next(r for r in range(1000) if min(ids, key=lambda p: leader_rank(RUN, r, p)) == first)


async def view_of(dht, secret: str, round_: int) -> NetCore:
    dht.member_key = derived_key(secret, "member")
    core = NetCore(dht, PeerConfig(run_id=RUN, run_secret=secret), dht.identity)
    core.spec, core.spec_hash, core.round, core.address = SPEC, SPEC.hash(), round_, "127.0.0.1:8"
    await core.refresh()
    return core


def test_a_stranger_is_not_in_a_private_peers_view_nor_waited_for_nor_a_leader(dht):
    member, stranger, other_run = identity(), identity(), identity()
    r = round_led_by([dht.identity.peer_id, member.peer_id, stranger.peer_id, other_run.peer_id], stranger.peer_id)
    key = swarm.peers_key(RUN)
    publish(dht, member, KEY, record(member.peer_id, r), key)
    publish(dht, stranger, b"", record(stranger.peer_id, r), key)
    publish(dht, other_run, OTHER_KEY, record(other_run.peer_id, r), key)
    core = asyncio.run(view_of(dht, SECRET, r))
    assert set(core.view) == {member.peer_id}
    assert core.expected_members(r) == {core.peer_id, member.peer_id}, "the leader waits for members only"
    assert stranger.peer_id not in dict(core.candidates(r, set())) and core.candidates(r, set())
    view = asyncio.run(swarmview.collect(dht, RUN))
    assert {p["peer_id"] for p in view["peers"]} == {core.peer_id, member.peer_id}
    assert view["skipped"] == 2, view["skipped"]

    public = asyncio.run(view_of(dht, "", r))   # the same DHT read without the secret
    assert {member.peer_id, stranger.peer_id, other_run.peer_id} <= set(public.view)
    assert public.candidates(r, set())[0][0] == stranger.peer_id, "without proofs the stranger would lead"


def test_a_strangers_earlier_spec_does_not_become_the_private_runs(dht):
    member, stranger = identity(), identity()
    key = swarm.spec_key(RUN)
    publish(dht, member, KEY, {"spec": SPEC.to_record(), "created": get_dht_time(), "origin": member.peer_id}, key)
    publish(dht, stranger, b"", {"spec": RunSpec(model="base").to_record(), "created": 1.0,
                                 "origin": stranger.peer_id}, key)
    dht.member_key = KEY
    winner = swarm.winning_spec(asyncio.run(swarm.read(dht, key, 5.0)))
    assert winner is not None and winner["origin"] == member.peer_id
    dht.member_key = b""
    winner = swarm.winning_spec(asyncio.run(swarm.read(dht, key, 5.0)))
    assert winner is not None and winner["origin"] == stranger.peer_id, "a public reader takes the earliest"


def test_a_proof_is_bound_to_its_signer_its_run_and_its_kind():
    stored = records.sealed(KEY, swarm.peers_key(RUN), "peer-a", {"x": 1})
    assert records.opened(KEY, swarm.peers_key(RUN), "peer-a", stored) == ({"x": 1}, True)
    assert not records.opened(KEY, swarm.peers_key(RUN), "peer-b", stored)[1], "another signer"
    assert not records.opened(KEY, swarm.peers_key("other"), "peer-a", stored)[1], "another run"
    assert not records.opened(KEY, swarm.history_key(RUN), "peer-a", stored)[1], "another kind of record"
    assert not records.opened(OTHER_KEY, swarm.peers_key(RUN), "peer-a", stored)[1], "another secret"
    assert not records.opened(KEY, swarm.peers_key(RUN), "peer-a", {"x": 1})[1], "no proof"
    assert not records.opened(KEY, swarm.peers_key(RUN), "peer-a", {"member": 7, "value": 1})[1]
    assert records.opened(b"", swarm.peers_key(RUN), "peer-a", stored) == ({"x": 1}, True), "a public reader"
