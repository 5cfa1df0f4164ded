"""Signed DHT records over real hivemind nodes on 127.0.0.1: a bootstrap-like node, a victim
peer, a reader, and two forgers (one without validators writing unsigned values, one that signs
with its own key but claims the victim's id). Honest nodes refuse the forged records; readers see
the victim's value and skip unprotected subkeys."""

from __future__ import annotations

from functools import partial

import pytest
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.routing import DHTID
from hivemind.utils import MSGPackSerializer, get_dht_time

from peer import records
from peer.dht import ChildSafeDHT, create_dht, join_addresses
from peer.net import swarm
from peer.net.loop import NetLoop
from tests.fixtures import identity

RUN = "rec-run"
LOCAL = ["/ip4/127.0.0.1/tcp/0"]


def progress(addr: str, round_: int) -> dict:
    return swarm.PeerRecord("x", addr, round_, 1, 4, 0.0, False, False, round_, "abcd", get_dht_time(),
                            swarm.WAIT).to_value()


@pytest.fixture(scope="module")
def nodes():
    victim_id, forger_id = identity(), identity()
    boot = create_dht(initial_peers=[], host_maddrs=LOCAL)
    join = join_addresses(boot)
    victim = create_dht(initial_peers=join, host_maddrs=LOCAL, identity=victim_id)
    reader = create_dht(initial_peers=join, host_maddrs=LOCAL)
    unsigned = ChildSafeDHT(initial_peers=join, host_maddrs=LOCAL, start=True)   # runs no validator at all
    # signs with its own key, but without the id check: it sends what an honest node would refuse itself
    claimer = ChildSafeDHT(initial_peers=join, host_maddrs=LOCAL, start=True,
                           record_validators=[RSASignatureValidator(forger_id.key)])
    loop = NetLoop("test-records")   # after the forks
    loop.start()
    try:
        yield {"boot": boot, "victim": victim, "reader": reader, "unsigned": unsigned, "claimer": claimer,
               "victim_id": victim_id, "forger_id": forger_id, "loop": loop}
    finally:
        loop.stop()
        for dht in (claimer, unsigned, reader, victim, boot):
            dht.shutdown()


async def _held(_dht, node, key: str) -> dict:
    """What this node keeps in its own storage for `key`: {subkey: value without signature}."""
    found = node.protocol.storage.get(DHTID.generate(source=key))
    if found is None:
        return {}
    out = {}
    for sub, (value_bytes, _exp) in found.value.items():
        out[sub] = MSGPackSerializer.loads(RSASignatureValidator._SIGNATURE_RE.sub(b"", value_bytes))
    return out


def held(dht, key: str) -> dict:
    return dht.run_coroutine(partial(_held, key=key))


def test_a_protected_subkey_names_only_its_keys_owner():
    me, other = identity(), identity()
    sub = records.owner_subkey(me)
    assert records.owner_of(sub) == me.peer_id
    assert records.owner_of(f"{other.peer_id}{sub[len(me.peer_id):]}") is None, "another id with my key"
    assert records.owner_of(me.peer_id) is None and records.owner_of(b"x") is None and records.owner_of(sub + "x") is None


def test_forged_records_are_refused_and_readers_see_the_honest_one(nodes):
    loop, victim_id, forger_id = nodes["loop"], nodes["victim_id"], nodes["forger_id"]
    key = swarm.peers_key(RUN)
    honest = progress("127.0.0.1:7001", 3)
    assert loop.call(swarm.store(nodes["victim"], key, honest, 5.0), 20)

    # 1. no signature, under the victim's own protected subkey (a later expiration: it would win)
    forged = progress("203.0.113.66:1", 99)
    nodes["unsigned"].store(key, forged, get_dht_time() + swarm.RECORD_TTL_S + 5,
                            subkey=records.owner_subkey(victim_id))
    # 2. signed with the forger's own key, claiming the victim's id
    claimed = f"{victim_id.peer_id}[owner:{forger_id.public_key.decode()}]"
    nodes["claimer"].store(key, forged, get_dht_time() + swarm.RECORD_TTL_S, subkey=claimed)

    victim_sub = records.owner_subkey(victim_id)
    for name in ("boot", "victim", "reader"):
        kept = held(nodes[name], key)
        assert kept.get(victim_sub, honest) == honest, f"{name} took the unsigned value over the victim's"
        assert claimed not in kept, f"{name} kept a record signed by one key under another peer's id"
    assert held(nodes["boot"], key) == {victim_sub: honest}
    assert held(nodes["unsigned"], key).get(victim_sub) == forged, "a node without validators keeps anything"
    for name in ("boot", "victim", "reader"):
        got = loop.call(swarm.read_peers(nodes[name], RUN, 5.0), 20)
        assert set(got) == {victim_id.peer_id} and got[victim_id.peer_id].round == 3, name


def test_an_unprotected_progress_record_is_ignored_by_readers(nodes):
    loop = nodes["loop"]
    key = swarm.peers_key(RUN + "-b")
    honest = progress("127.0.0.1:7001", 3)
    assert loop.call(swarm.store(nodes["victim"], key, honest, 5.0), 20)
    nodes["unsigned"].store(key, progress("127.0.0.1:7009", 5), get_dht_time() + swarm.RECORD_TTL_S,
                            subkey=identity().peer_id)   # a well-formed record, but nobody signed it
    got, skipped = loop.call(swarm.read_counted(nodes["reader"], key, 5.0), 20)
    assert set(got) == {nodes["victim_id"].peer_id} and skipped == 1
    assert set(loop.call(swarm.read_peers(nodes["reader"], RUN + "-b", 5.0), 20)) == {nodes["victim_id"].peer_id}


@pytest.mark.parametrize("digests, trusted", [
    ({"me": "b"}, "b"),
    ({"me": "b", "p": "a"}, None),                       # one peer against us: nobody reloads
    ({"me": "b", "p": "a", "q": "a"}, "a"),              # two of three signers
    ({"me": "b", "n": "b", "p": "a", "q": "a"}, None),   # an even split
    ({"me": "b", "p": "a", "q": "a", "r": "c"}, None),   # the most frequent, but no majority
    ({"me": "b", "p": "a", "q": "a", "r": "a"}, "a"),
])
def test_a_digest_is_trusted_with_a_majority_of_its_rounds_signers(digests, trusted):
    assert swarm.trusted_digest(digests)[0] == trusted
    assert swarm.quorum(1) == 1 and swarm.quorum(2) == 2 and swarm.quorum(3) == 2 and swarm.quorum(4) == 3
