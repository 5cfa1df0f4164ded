"""LinkTest over a real gRPC server in this process: the callee counts what arrived after the
first chunk over the time it took, stops at its byte cap, and refuses callers beyond its limit."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from peer._proto import peer_pb2 as pb
from peer._proto import peer_pb2_grpc
from peer.net import linktest
from peer.net.client import CHANNEL_OPTIONS, CHUNK_BYTES
from peer.net.server import Servicer


async def _serve():
    server = grpc.aio.server(options=CHANNEL_OPTIONS)
    servicer = Servicer(core=None)  # LinkTest needs no core
    peer_pb2_grpc.add_PeerServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, servicer, port


def _chunks(n: int, gate: asyncio.Event | None = None):
    async def gen():
        for i in range(n):
            if gate is not None and i == 1:
                await gate.wait()
            yield pb.LinkChunk(data=bytes(CHUNK_BYTES))
    return gen()


def test_counts_bytes_after_the_first_chunk():
    async def main():
        server, _, port = await _serve()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS) as ch:
                reply = await peer_pb2_grpc.PeerStub(ch).LinkTest(_chunks(8), timeout=10)
        finally:
            await server.stop(0)
        assert reply.bytes == 7 * CHUNK_BYTES and reply.seconds > 0

    asyncio.run(main())


def test_stops_at_the_byte_cap(monkeypatch):
    monkeypatch.setattr(linktest, "LINK_TEST_MAX_BYTES", 4 * CHUNK_BYTES)

    async def main():
        server, _, port = await _serve()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS) as ch:
                reply = await peer_pb2_grpc.PeerStub(ch).LinkTest(_chunks(50), timeout=10)
        finally:
            await server.stop(0)
        assert reply.bytes == 3 * CHUNK_BYTES

    asyncio.run(main())


def test_refuses_callers_beyond_the_limit():
    async def main():
        server, servicer, port = await _serve()
        gate = asyncio.Event()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS) as ch:
                stub = peer_pb2_grpc.PeerStub(ch)
                held = [asyncio.ensure_future(stub.LinkTest(_chunks(3, gate), timeout=10))
                        for _ in range(linktest.LINK_TEST_CALLERS)]
                for _ in range(100):
                    if servicer.link_tests.active == linktest.LINK_TEST_CALLERS:
                        break
                    await asyncio.sleep(0.02)
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await stub.LinkTest(_chunks(2), timeout=10)
                assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                gate.set()
                replies = await asyncio.gather(*held)
        finally:
            await server.stop(0)
        assert all(r.bytes == 2 * CHUNK_BYTES for r in replies)

    asyncio.run(main())
