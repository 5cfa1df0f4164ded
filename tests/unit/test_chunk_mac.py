"""Per-chunk MACs of a private run (peer.net.chunkmac): a man in the middle between two real gRPC
peers (a TCP proxy in this process) that flips one byte of a later chunk is refused by the chunk's
MAC, naming the round, the shard, the peer and the chunk, in both directions (a member's part to its
owner, the reduced shard back) and in a replayed update; without a secret the header's sha256
catches that plain corruption. A forger who also rewrites a reply's unsigned header is caught only
by the MAC; a unary reply changed in flight is refused by its MAC in a private run and taken without."""

from __future__ import annotations

import asyncio
import logging

import grpc
import numpy as np
import pytest
import torch

from peer._proto import peer_pb2 as pb
from peer.codecs import get_codec
from peer.config import PeerConfig, RunSpec
from peer.net import allreduce as ar
from peer.net import gather, scatter
from peer.net import owner as owner_side
from peer.net.auth import derived_key
from peer.net.chunkmac import ChunkMacs, MacError
from peer.net.client import CHUNK_BYTES
from peer.net.core import NetCore
from peer.net.loop import Deadline
from peer.net.replay import replay
from peer.net.round import roster_hash
from peer.net.server import start_server
from peer.outer import GlobalState, outer_step
from tests.fixtures import identity, pump

pytestmark = pytest.mark.timeout(60)
SECRET = "a-long-run-secret-0123456789"
MARK = 0xAB   # every byte of the payload's third MiB (a shard stream's chunk 3: its chunk 0 is the header alone), a
#             replayed update's chunk 2: the proxy flips one inside the first run of 64


class Tamper:
    """A TCP proxy in front of 127.0.0.1:`upstream_port` that flips one byte, once, of what flows
    `up` (client to server) or down: the first byte that completes a run of 64 MARK bytes."""

    RUN = 64

    def __init__(self, upstream_port: int, up: bool, replace: tuple[bytes, bytes] | None = None):
        self.upstream_port, self.up, self.replace = upstream_port, up, replace   # replace: (old, new), once
        self.flipped = False
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._pipe, "127.0.0.1", 0)
        return f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()

    def _flip(self, data: bytes, run: int) -> tuple[bytes, int]:
        """`data` with the byte that completes the first MARK run flipped; the MARK bytes it ends with."""
        trailing = len(data) - len(data.rstrip(bytes([MARK])))
        after = run + len(data) if trailing == len(data) else trailing
        if self.flipped:
            return data, after
        if self.replace is not None:
            if self.replace[0] in data:
                self.flipped = True
                return data.replace(*self.replace, 1), after
            return data, after
        lead = len(data) - len(data.lstrip(bytes([MARK])))
        if run + lead >= self.RUN:   # a run that began in an earlier read ends here
            at = self.RUN - run - 1
        else:
            found = data.find(bytes([MARK]) * self.RUN)
            if found < 0:
                return data, after
            at = found + self.RUN - 1
        self.flipped = True
        out = bytearray(data)
        out[at] ^= 0x07
        return bytes(out), after

    async def _pipe(self, reader, writer) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)

        run = 0

        def tamper(data: bytes) -> bytes:
            nonlocal run
            data, run = self._flip(data, run)
            return data

        await asyncio.gather(pump(reader, up_writer, tamper if self.up else None),
                             pump(up_reader, writer, None if self.up else tamper))


def marked_payload(num_chunks: int = 4) -> bytes:
    """fp32 values whose chunk 2 is all MARK bytes (a finite value), the others random."""
    values = np.random.default_rng(0).standard_normal(num_chunks * CHUNK_BYTES // 4).astype("<f4")
    raw = bytearray(values.tobytes())
    raw[2 * CHUNK_BYTES:3 * CHUNK_BYTES] = bytes([MARK]) * CHUNK_BYTES
    return bytes(raw)


async def pair(secret: str, up: bool):
    """An owner and a member (real cores, the owner's real server) and a roster in which the
    member reaches the owner only through a Tamper proxy."""
    spec = RunSpec(model="tiny", codec="fp32")
    cores = []
    for _ in range(2):
        core = NetCore(None, PeerConfig(run_id="mitm", run_secret=secret), identity())  # type: ignore[arg-type]
        core.spec, core.spec_hash, core.round = spec, spec.hash(), 1
        cores.append(core)
    owner, sender = cores
    server, port = await start_server(owner, "127.0.0.1", 0)
    proxy = Tamper(port, up)
    address = await proxy.start()
    numel = len(marked_payload()) // 4
    members = sorted([pb.Member(peer_id=owner.peer_id, address=address, weight=1.0, samples=4),
                      pb.Member(peer_id=sender.peer_id, weight=1.0, samples=4, client_mode=True)],
                     key=lambda m: m.peer_id)
    roster = pb.Roster(round=1, leader=owner.peer_id, members=members, shard_bounds=[0, numel],
                       owners=[owner.peer_id], codec="fp32", numel=numel)
    roster.hash = roster_hash(roster)
    for core in cores:
        core.ctx(1).roster.set_result(roster)
    owner_side.own_shards(owner, owner.ctx(1), roster)
    values = torch.from_numpy(np.frombuffer(marked_payload(), dtype="<f4").copy())
    owner.ctx(1).owned[0].add(owner.peer_id, values, ar.payload_digest(marked_payload()))   # the owner's own part

    async def close() -> None:
        await proxy.stop()
        await server.stop(None)
        for core in cores:
            await core.channels.close()

    return owner, sender, roster, proxy, close


@pytest.mark.parametrize("secret", ["", SECRET], ids=["public", "private"])
def test_a_byte_flipped_in_a_later_chunk_of_a_part_is_refused(secret, caplog):
    async def body():
        owner, sender, roster, proxy, close = await pair(secret, up=True)
        try:
            with caplog.at_level(logging.WARNING):
                await scatter.send_shard(sender, sender.ctx(1), roster, 0, marked_payload(), Deadline(30))
            assert proxy.flipped
            assert (0, False) not in sender.ctx(1).accepted and sender.peer_id not in owner.ctx(1).owned[0].received
            said = [r.getMessage() for r in caplog.records if r.name == "peer.net.scatter"]
            assert len(said) == 1 and "round 1: sending shard 0" in said[0], said
            if secret:   # refused at the changed chunk, before the payload's hash is even complete
                heard = [r.getMessage() for r in caplog.records if r.name == "peer.net.owner"]
                assert len(heard) == 1, heard
                refused = f"{sender.peer_id[-6:]}'s part of shard 0 to its owner: chunk 3 fails its MAC"
                assert f"round 1: refused {sender.peer_id[-6:]}'s part of shard 0" in heard[0] and refused in heard[0]
                assert refused in said[0], said
            else:
                assert "payload digest does not match its header" in said[0]
        finally:
            await close()

    asyncio.run(body())


@pytest.mark.parametrize("secret", ["", SECRET], ids=["public", "private"])
def test_a_byte_flipped_in_a_later_chunk_of_a_reduced_shard_is_refused(secret):
    async def body():
        owner, sender, roster, proxy, close = await pair(secret, up=False)
        try:
            await scatter.send_shard(sender, sender.ctx(1), roster, 0, marked_payload(), Deadline(30))
            assert (0, False) in sender.ctx(1).accepted, "the part went up untouched"
            with pytest.raises(RuntimeError) as e:
                await gather.pull_shard(sender, roster, 0, owner.peer_id, 20.0)
            assert proxy.flipped
            if secret:
                assert f"round 1: shard 0 from {owner.peer_id[-6:]}: chunk 3 fails its MAC" in str(e.value)
            else:
                assert "payload digest does not match its header" in str(e.value)
        finally:
            await close()

    asyncio.run(body())


def test_without_a_mac_a_forged_header_and_payload_pass_and_with_one_they_do_not():
    """What the header's sha256 cannot do: a forger rewrites a reply's (unsigned) header to the
    hash of the bytes it changed. read_payload takes that without a MAC, and refuses it with one."""
    payload = bytearray(marked_payload(3))
    header = pb.ShardHeader(round=1, roster_hash="r", shard=0, codec="fp32", num_bytes=len(payload),
                            sha256=ar.payload_digest(payload))
    req = pb.ShardRequest(round=1, roster_hash="r", shard=0)
    macs = ChunkMacs(derived_key(SECRET, "chunk-mac"))
    for mac in (ChunkMacs().shard(req, "owner"), macs.shard(req, "owner")):
        sent = list(ar.chunks(header, bytes(payload), mac))
        forged = bytearray(payload)
        forged[2 * CHUNK_BYTES + 5] ^= 1
        sent[0].header.sha256 = ar.payload_digest(forged)
        sent[3].data = bytes(forged[2 * CHUNK_BYTES:3 * CHUNK_BYTES])   # [0] is the header alone

        async def rest(chunks=sent):
            for c in chunks[1:]:
                yield c

        if not mac.key:
            got = asyncio.run(ar.read_payload(sent[0], rest(), len(payload), mac))
            assert got == forged, "no MAC: the forgery is taken"
            continue
        with pytest.raises(MacError, match="chunk 0 fails its MAC"):
            mac.check(0, sent[0])   # the rewritten header
        with pytest.raises(MacError, match="chunk 3 fails its MAC"):
            asyncio.run(ar.read_payload(sent[0], rest(), len(payload), mac))


def test_a_mac_binds_the_chunk_to_its_place_and_its_stream():
    macs = ChunkMacs(derived_key(SECRET, "chunk-mac"))
    h = pb.ShardHeader(round=3, roster_hash="r", sender="peer-a", shard=1)
    sent = list(ar.chunks(h, bytes(3 * CHUNK_BYTES), macs.contribution(h)))
    mac = macs.contribution(h)
    for i, c in enumerate(sent):
        mac.check(i, c)
    with pytest.raises(MacError, match="chunk 1 fails"):
        mac.check(1, sent[2])   # moved
    other = pb.ShardHeader(round=3, roster_hash="r", sender="peer-a", shard=1, backup=True)
    with pytest.raises(MacError, match="chunk 1 fails"):
        macs.contribution(other).check(1, sent[1])   # another stream: the part to the backup owner
    with pytest.raises(MacError, match="chunk 1 carries no MAC"):
        mac.check(1, pb.ShardChunk(data=bytes(sent[1].data)))
    with pytest.raises(MacError, match="fails"):   # another secret
        ChunkMacs(derived_key(SECRET + "x", "chunk-mac")).contribution(h).check(0, sent[0])
    ChunkMacs().contribution(h).check(1, pb.ShardChunk(data=b"x"))   # a public run checks nothing
    assert derived_key(SECRET, "chunk-mac") != derived_key(SECRET, "member") and not derived_key("", "chunk-mac")


@pytest.mark.parametrize("secret", ["", SECRET], ids=["public", "private"])
def test_a_byte_flipped_in_a_replayed_update_is_refused(secret):
    async def body():
        numel = len(marked_payload(3)) // 4
        g = torch.Generator().manual_seed(1)
        start = GlobalState(torch.randn(numel, generator=g), torch.zeros(numel), 4, 100)
        grad = torch.from_numpy(np.frombuffer(marked_payload(3), dtype="<f4").copy())
        after = GlobalState(*outer_step(start.theta, start.momentum, grad, 0.7, 0.9), 5, 110)
        donor = NetCore(None, PeerConfig(run_id="mitm", run_secret=secret), identity())  # type: ignore[arg-type]
        donor.updates.add(4, True, "fp32", [0, numel], [get_codec("fp32").encode(grad)], 10, after.digest())
        me = NetCore(None, PeerConfig(run_id="mitm", run_secret=secret), identity())  # type: ignore[arg-type]
        server, port = await start_server(donor, "127.0.0.1", 0)
        clean = await replay(me.channels, (donor.peer_id, f"127.0.0.1:{port}"), start, 5, 0.7, 0.9, Deadline(20))
        assert clean.digest() == after.digest(), "untouched, the replay reaches the donor's state"
        proxy = Tamper(port, up=False)
        address = await proxy.start()
        try:
            with pytest.raises(ValueError) as e:
                await replay(me.channels, (donor.peer_id, address), start, 5, 0.7, 0.9, Deadline(20))
            assert proxy.flipped
            if secret:
                assert f"the update of round 4 from {donor.peer_id[-6:]}: chunk 2 fails its MAC" in str(e.value)
            else:
                assert "payload does not match its header" in str(e.value)
        finally:
            await proxy.stop()
            await server.stop(None)
            await me.channels.close()

    asyncio.run(body())



@pytest.mark.parametrize("secret", ["", SECRET], ids=["public", "private"])
def test_a_unary_reply_changed_in_flight_is_refused_by_its_mac(secret):
    async def body():
        server_core = NetCore(None, PeerConfig(run_id="mitm-run", run_secret=secret), identity())  # type: ignore
        me = NetCore(None, PeerConfig(run_id="mitm-run", run_secret=secret), identity())  # type: ignore[arg-type]
        server, port = await start_server(server_core, "127.0.0.1", 0)
        proxy = Tamper(port, up=False, replace=(b"mitm-run", b"evil-run"))
        address = await proxy.start()
        try:
            if not secret:
                reply = await me.channels.stub(address).Health(pb.HealthRequest(), timeout=5)
                assert proxy.flipped and reply.run_id == "evil-run", "no MAC: the forged reply is taken"
                return
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await me.channels.stub(address).Health(pb.HealthRequest(), timeout=5)
            assert proxy.flipped and e.value.code() == grpc.StatusCode.DATA_LOSS
            assert "the reply to Health fails its MAC" in e.value.details()
            direct = await me.channels.stub(f"127.0.0.1:{port}").Health(pb.HealthRequest(), timeout=5)
            assert direct.run_id == "mitm-run", "untouched, the sealed reply is taken"
        finally:
            await proxy.stop()
            await server.stop(None)
            await me.channels.close()

    asyncio.run(body())
