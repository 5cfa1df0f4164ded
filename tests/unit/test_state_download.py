"""State download over real gRPC servers on loopback: a donor that dies after sending part of
the state is replaced by the next donor, which resumes at the byte offset already held; a
donor holding another state makes the download start over; a corrupt payload is refused."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import torch

from peer._proto import peer_pb2 as pb
from peer._proto import peer_pb2_grpc
from peer.net.client import Channels
from peer.net.loop import Deadline
from peer.net.state_sync import StateSnapshot, download
from peer.outer import GlobalState

NUMEL = 300_000  # 2.4 MB: three chunks


def state(seed: int, round_: int = 7) -> GlobalState:
    g = torch.Generator().manual_seed(seed)
    return GlobalState(torch.randn(NUMEL, generator=g), torch.randn(NUMEL, generator=g), round_, 1234)


class Donor(peer_pb2_grpc.PeerServicer):
    """Serves one snapshot like a peer does; `die_after` chunks, then the call breaks."""

    def __init__(self, snap: StateSnapshot, die_after: int | None = None, corrupt: bool = False):
        self.snap, self.die_after, self.corrupt = snap, die_after, corrupt
        self.offsets: list[int] = []

    async def GetState(self, request, context):
        self.offsets.append(request.offset)
        for i, chunk in enumerate(self.snap.chunks(request.offset)):
            if self.die_after is not None and i == self.die_after:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "donor died")
            if self.corrupt and i == 1:
                chunk = pb.StateChunk(data=bytes(len(chunk.data)))
            await context.write(chunk)


async def serve(servicer) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    peer_pb2_grpc.add_PeerServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


def run_download(donors: list[Donor]) -> GlobalState:
    async def body():
        servers = [await serve(d) for d in donors]
        channels = Channels()
        try:
            return await download(channels, [(f"donor{i}", addr) for i, (_, addr) in enumerate(servers)], 0,
                                  "newcomer", NUMEL, "spec", Deadline(30))
        finally:
            await channels.close()
            for server, _ in servers:
                await server.stop(None)
    return asyncio.run(body())


def test_next_donor_resumes_where_the_dead_one_stopped():
    s = state(1)
    snap = StateSnapshot.of(s, "spec")
    first, second = Donor(snap, die_after=1), Donor(snap)
    got = run_download([first, second])
    assert got.digest() == s.digest() and got.round == 7 and got.global_samples == 1234
    assert first.offsets == [0]
    assert second.offsets and second.offsets[0] > 0, "the second donor should resume, not start over"


def test_donor_of_another_state_makes_the_download_start_over():
    snap = StateSnapshot.of(state(1), "spec")
    other = state(2, round_=8)
    first, second = Donor(snap, die_after=1), Donor(StateSnapshot.of(other, "spec"))
    got = run_download([first, second])
    assert got.digest() == other.digest()
    assert second.offsets[0] > 0 and second.offsets[-1] == 0


def test_corrupt_payload_is_refused_and_the_next_donor_used():
    s = state(3)
    snap = StateSnapshot.of(s, "spec")
    got = run_download([Donor(snap, corrupt=True), Donor(snap)])
    assert got.digest() == s.digest()
    with pytest.raises(RuntimeError, match="sha256"):
        run_download([Donor(snap, corrupt=True)])
