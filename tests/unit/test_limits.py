"""Per-caller limits over a real gRPC server: a flood of calls from one identity, or one identity
holding too many calls open, is refused with RESOURCE_EXHAUSTED while another caller is answered."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from peer._proto import peer_pb2 as pb
from peer.config import PeerConfig
from peer.net.core import NetCore
from peer.net.limits import CallerLimits
from peer.net.server import start_server
from tests.fixtures import channels, identity

pytestmark = pytest.mark.timeout(60)


def test_buckets_refill_and_calls_at_once_are_counted():
    limits = CallerLimits(peer=(10.0, 3.0, 2), host=(1000.0, 1000.0, 100))
    assert [limits.enter_peer("p") for _ in range(2)] == ["", ""]
    assert "2 calls at once already" in limits.enter_peer("p")
    limits.leave_peer("p")
    limits.leave_peer("p")
    assert limits.enter_peer("p") == "" and "calls/s" in limits.enter_peer("p"), "the burst of 3 is spent"
    assert limits.enter_peer("q") == "", "another caller has its own bucket"


def test_a_flood_from_one_identity_does_not_starve_another():
    async def main():
        core = NetCore(None, PeerConfig(run_id="lim"), identity())  # type: ignore[arg-type]
        core.limits = CallerLimits(peer=(5.0, 5.0, 2), host=(1000.0, 1000.0, 200))
        server, port = await start_server(core, "127.0.0.1", 0)
        address = f"127.0.0.1:{port}"
        flood, calm = channels(), channels()
        try:
            async def health(ch):
                try:
                    await ch.stub(address).Health(pb.HealthRequest(), timeout=5)
                    return "ok"
                except grpc.aio.AioRpcError as e:
                    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e
                    return e.details()

            results = await asyncio.gather(*(health(flood) for _ in range(60)), health(calm))
            assert results[-1] == "ok", "the other caller is answered"
            refused = [r for r in results[:-1] if r != "ok"]
            assert 55 - 5 <= len(refused) <= 57 and all("peer " in r for r in refused), refused[:3]

            gate = asyncio.Event()

            async def chunks():
                yield pb.LinkChunk(data=b"x")
                await gate.wait()

            await asyncio.sleep(1.1)   # the flooder's bucket refills
            held = [asyncio.ensure_future(flood.stub(address).LinkTest(chunks(), timeout=10)) for _ in range(2)]
            await asyncio.sleep(0.3)
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await flood.stub(address).LinkTest(chunks(), timeout=5)
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "2 calls at once" in e.value.details()
            assert await health(calm) == "ok"
            gate.set()
            await asyncio.gather(*held)
        finally:
            await flood.close()
            await calm.close()
            await server.stop(None)

    asyncio.run(main())
