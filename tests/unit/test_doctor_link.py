"""peer doctor's link check over a real gRPC server on loopback: it streams the peer's real
state again and again, and a peer that moves on to a newer state meanwhile (short rounds: the
state it pinned is no longer held) is followed to that state, not reported as a broken link."""

from __future__ import annotations

import asyncio

import pytest

from peer import doctor
from peer._proto import peer_pb2 as pb
from peer.config import PeerConfig
from peer.net.core import NetCore
from peer.net.server import start_server
from tests.fixtures import channels as signed_channels
from tests.fixtures import named
from tests.unit.test_state_download import NUM_BYTES, snapshot

pytestmark = pytest.mark.timeout(60)


def test_the_link_test_follows_a_peer_that_moved_on_to_a_newer_state(monkeypatch):
    monkeypatch.setattr(doctor, "LINK_TEST_S", 1.5)
    monkeypatch.setattr(doctor, "LINK_TEST_BYTES", 1 << 40)   # time, not bytes, ends it
    first, newer = snapshot(1, round_=7), snapshot(2, round_=8)

    async def body():
        core = NetCore(None, PeerConfig(), named("peer"))
        core.snapshot = first
        server, port = await start_server(core, "127.0.0.1", 0)
        channels = signed_channels()

        async def move_on():
            await asyncio.sleep(0.3)
            core.held.current, core.held.old = newer, {}   # the old one's pin ran out: not held

        try:
            mover = asyncio.ensure_future(move_on())
            got, seconds, header = await doctor._download(channels.stub(f"127.0.0.1:{port}"), pb)
            await mover
        finally:
            await channels.close()
            await server.stop(None)
        return got, seconds, header

    got, seconds, header = asyncio.run(body())
    assert header.round == 8 and header.sha256 == newer.header.sha256, "measured on the state it holds now"
    assert got > 2 * NUM_BYTES and seconds <= 1.5 + 1.0
