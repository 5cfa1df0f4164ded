"""A copied key file (peer.net.twin) over a real DHT and a real gRPC server in this process: a second
process holding our id is found before we publish, whether it answers Health at its record's address
or (client mode) only keeps refreshing its record; a record our own previous run left behind (its
address silent, not refreshed) lets us start. hivemind's check at DHT start can miss a peer that
joined moments before, so this is the check that the twin test in test_private_run relies on."""

from __future__ import annotations

import asyncio
import threading

import pytest
from hivemind.utils import get_dht_time

from peer.config import PeerConfig, RunSpec
from peer.dht import DuplicateIdentity, create_dht
from peer.net import swarm, twin
from peer.net.core import NetCore
from peer.net.server import start_server
from tests.fixtures import identity, store_as

pytestmark = pytest.mark.timeout(120)
RUN, SPEC = "twin", RunSpec(model="tiny")


@pytest.fixture(scope="module")
def dht():
    node = create_dht(initial_peers=[], host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    yield node
    node.shutdown()


def publish(dht, who, addr: str) -> None:
    rec = swarm.PeerRecord(who.peer_id, addr, 3, 5, 20, 1.0, True, not addr, 3, SPEC.hash(), get_dht_time(),
                           swarm.TRAIN)
    assert store_as(dht, who, swarm.peers_key(RUN), rec.to_value())


def core_of(dht, who) -> NetCore:
    core = NetCore(dht, PeerConfig(run_id=RUN), who)
    core.spec, core.spec_hash, core.address = SPEC, SPEC.hash(), "127.0.0.1:1"
    return core


def test_a_twin_that_answers_at_its_address_is_refused(dht):
    me = identity()

    async def body():
        other = core_of(dht, me)   # the first process with this key, serving
        server, port = await start_server(other, "127.0.0.1", 0)
        publish(dht, me, f"127.0.0.1:{port}")
        second = core_of(dht, me)
        try:
            with pytest.raises(DuplicateIdentity) as e:
                await twin.check(second, "/keys/a.key")
            assert f"it answers at 127.0.0.1:{port}" in str(e.value) and "/keys/a.key" in str(e.value)
        finally:
            await second.channels.close()
            await server.stop(None)
    asyncio.run(body())


def test_a_client_mode_twin_is_found_by_its_refreshed_record(dht):
    me, stop = identity(), threading.Event()
    publish(dht, me, "")

    def refresh():   # the twin re-publishes as a live peer does, every half second
        while not stop.wait(0.5):
            publish(dht, me, "")

    thread = threading.Thread(target=refresh, daemon=True)
    thread.start()
    try:
        with pytest.raises(DuplicateIdentity, match="refreshed as we watch"):
            asyncio.run(twin.check(core_of(dht, me), "/keys/b.key"))
    finally:
        stop.set()
        thread.join(10)


def test_the_record_of_our_own_previous_run_lets_us_start(dht):
    me = identity()
    publish(dht, me, "127.0.0.1:9")   # nothing listens there, and nobody refreshes it

    async def body():
        core = core_of(dht, me)
        try:
            await twin.check(core, "/keys/c.key")
        finally:
            await core.channels.close()
    asyncio.run(body())
