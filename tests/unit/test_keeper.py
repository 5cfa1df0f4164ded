"""The keeper's rules for getting a newer state, over a real DHT and a real gRPC donor: a DHT
read that times out (its process stopped) is retried, not fatal; a wait for a state nobody
holds or works on ends with NobodyAhead, never with an invented state; a link too slow for
the run is named in one line with its figures."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

import pytest
import torch
from hivemind.utils import get_dht_time

from peer.config import PeerConfig, RunSpec
from peer.dht import create_dht
from peer.net import swarm
from peer.net.core import NetCore
from peer.net.keeper import AheadWatch, Keeper, NobodyAhead
from peer.net.loop import Deadline, NetLoop
from peer.net.server import start_server
from peer.net.state_sync import StateSnapshot
from peer.outer import GlobalState
from tests.fixtures import identity, named, store_as_future

NUMEL = 200_000
SPEC = RunSpec(model="tiny", codec="fp32")


def rec(peer_id: str, round_: int, phase: str, state_round: int | None = None, addr: str = "127.0.0.1:1"
        ) -> swarm.PeerRecord:
    return swarm.PeerRecord(peer_id, addr, round_, 0, 0, 0.0, phase == swarm.TRAIN, False,
                            round_ if state_round is None else state_round, SPEC.hash(), get_dht_time(), phase)


def test_nobody_ahead_only_when_no_live_peer_holds_or_works_on_the_round():
    watch = AheadWatch(6, grace_s=0.2)
    watch.check([rec("a", 5, swarm.TRAIN)])         # a still trains round 5: its state 6 will come
    time.sleep(0.3)
    watch.check([rec("a", 5, swarm.AVERAGE)])
    watch.check([rec("b", 6, swarm.WAIT)])          # b holds round 6
    time.sleep(0.3)
    with pytest.raises(NobodyAhead, match="no live peer is at round 6"):
        watch.check([rec("a", 5, swarm.SYNC), rec("c", 3, swarm.TRAIN)])


def test_a_known_dead_leader_does_not_keep_the_wait_going():
    watch = AheadWatch(6, ignore=frozenset({"dead"}), grace_s=0.2)
    watch.check([rec("dead", 5, swarm.AVERAGE)])
    time.sleep(0.3)
    with pytest.raises(NobodyAhead):
        watch.check([rec("dead", 5, swarm.AVERAGE), rec("a", 5, swarm.SYNC)])


def test_a_slow_link_is_named_with_its_figures():
    core = NetCore(None, PeerConfig(run_id="slow"), named("me"))  # type: ignore[arg-type]
    core.spec, core.numel = SPEC, 1_000_000
    keeper = Keeper(core, genesis=False)
    assert keeper.lag_verdict(5) == "", "nothing measured yet: no verdict"
    now = time.monotonic()
    core.round_clock.marks = [(now - 9, 10), (now - 6, 11), (now - 3, 12), (now, 13)]   # a round every 3 s
    keeper.fetch_rate_bps = 1e6   # 4 MB of fp32 update: 4 s to fetch, more than a round
    assert keeper.lag_verdict(2) == "", "a little too slow: three rounds missed are evidence, two are not"
    line = keeper.lag_verdict(3)
    assert "cannot keep up with the swarm" in line
    assert "1.00 MB/s" in line and "4.00 MB" in line and "every 3.0 s" in line and "--target-steps" in line
    keeper.fetch_rate_bps = 0.5e6   # 8 s to fetch: over twice a round, one miss tells
    assert "cannot keep up" in keeper.lag_verdict(1)
    keeper.fetch_rate_bps = 10e6
    assert keeper.lag_verdict(9) == "", "0.4 s per update keeps up with a 3 s round"


@pytest.fixture
def net():
    loop = NetLoop("test-keeper")
    loop.start()
    yield loop
    loop.stop()


def test_a_download_survives_the_dht_timing_out(net):
    dht_identity = identity()
    dht = create_dht(initial_peers=[], host_maddrs=["/ip4/127.0.0.1/tcp/0"], identity=dht_identity)
    resumed = threading.Event()
    try:
        g = torch.Generator().manual_seed(5)
        held = GlobalState(torch.randn(NUMEL, generator=g), torch.zeros(NUMEL), 3, 77)
        donor_identity = identity()   # its record is signed with its own key, through our node (store_as)
        donor = NetCore(dht, PeerConfig(run_id="dl"), donor_identity)
        donor.spec, donor.spec_hash, donor.numel = SPEC, SPEC.hash(), NUMEL
        donor.snapshot = StateSnapshot.of(held, SPEC.hash())
        server, port = net.call(start_server(donor, "127.0.0.1", 0), 10)
        me = NetCore(dht, PeerConfig(run_id="dl"), dht_identity)
        me.spec, me.spec_hash, me.numel = SPEC, SPEC.hash(), NUMEL
        keeper = Keeper(me, genesis=False)

        async def donor_record_forever():
            while True:
                value = rec("donor", 3, swarm.WAIT, addr=f"127.0.0.1:{port}").to_value() | {"t": get_dht_time()}
                try:
                    await swarm.dht_call(store_as_future(dht, donor_identity, swarm.peers_key("dl"), value), 1.0,
                                         "store")
                except TimeoutError:
                    pass
                await asyncio.sleep(0.5)

        publisher = net.submit(donor_record_forever())
        os.kill(dht.pid, signal.SIGSTOP)   # every DHT read times out until SIGCONT
        threading.Timer(7.0, lambda: (os.kill(dht.pid, signal.SIGCONT), resumed.set())).start()
        started = time.monotonic()
        got = net.call(keeper.download(0, Deadline(60)), 70)
        assert resumed.is_set(), "the download should have needed the DHT back"
        assert got.digest() == held.digest() and time.monotonic() - started < 50
        publisher.cancel()
        net.call(server.stop(None), 10)
    finally:
        if not resumed.is_set():
            os.kill(dht.pid, signal.SIGCONT)
        dht.shutdown()
