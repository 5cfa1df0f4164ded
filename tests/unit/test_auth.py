"""Who is calling, over a real gRPC server in this process: every call is signed by its caller's
key; unsigned calls, keys that are not the claimed id's, bad signatures, replays, skewed clocks and
calls that claim another peer's id are refused; a private run refuses calls without its secret, and
a peer refused for its secret is told so in one line."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from peer._proto import peer_pb2 as pb
from peer._proto import peer_pb2_grpc
from peer.config import PeerConfig, RunSpec
from peer.net.auth import ID, KEY, SECRET_MISSING, SECRET_REFUSED, describe_secret_refusal
from peer.net.client import Channels
from peer.net.core import NetCore
from peer.net.server import start_server
from peer.net.signer import Signer
from tests.fixtures import identity

pytestmark = pytest.mark.timeout(60)
HEALTH, PROGRESS = "/diloco.Peer/Health", "/diloco.Peer/Progress"


async def serving(secret: str = "") -> tuple[NetCore, grpc.aio.Server, str]:
    core = NetCore(None, PeerConfig(run_id="auth", run_secret=secret), identity())  # type: ignore[arg-type]
    core.spec, core.spec_hash = RunSpec(model="tiny"), RunSpec(model="tiny").hash()
    server, port = await start_server(core, "127.0.0.1", 0)
    return core, server, f"127.0.0.1:{port}"


async def raw_call(address: str, method: str, request, metadata=()):
    """A call on a channel without our interceptors: the metadata is exactly what the test says."""
    async with grpc.aio.insecure_channel(address) as ch:
        stub = peer_pb2_grpc.PeerStub(ch)
        return await getattr(stub, method.rsplit("/", 1)[1])(request, metadata=metadata, timeout=5)


async def refused(address: str, method: str, request, metadata=()) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await raw_call(address, method, request, metadata)
    return e.value


def run(body):
    async def main():
        core, server, address = await serving()
        try:
            await body(core, address)
        finally:
            await server.stop(None)
            await core.channels.close()

    asyncio.run(main())


def test_a_signed_call_is_answered_and_an_unsigned_one_refused():
    async def body(core, address):
        me = identity()
        reply = await raw_call(address, HEALTH, pb.HealthRequest(), Signer(me).metadata(HEALTH, b""))
        assert reply.peer_id == core.peer_id
        e = await refused(address, HEALTH, pb.HealthRequest())
        assert e.code() == grpc.StatusCode.UNAUTHENTICATED and "unsigned call" in e.details()
        assert core.verifier.refused == 1

    run(body)


def test_a_key_that_is_not_the_claimed_ids_and_a_bad_signature_are_refused():
    async def body(core, address):
        me, other = identity(), identity()
        md = dict(Signer(me).metadata(HEALTH, b""))
        e = await refused(address, HEALTH, pb.HealthRequest(), tuple((md | {ID: other.peer_id}).items()))
        assert e.code() == grpc.StatusCode.UNAUTHENTICATED and "not to the claimed peer" in e.details()
        e = await refused(address, HEALTH, pb.HealthRequest(),
                          tuple((md | {KEY: other.public_key.decode(), ID: other.peer_id}).items()))
        assert "bad signature" in e.details()
        # signed over one request, sent with another: the signature covers the whole request
        req = pb.ProgressRequest(run_id="auth", spec_hash=core.spec_hash, round=0, peer_id=me.peer_id, steps=1)
        md = Signer(me).metadata(PROGRESS, req.SerializeToString())
        req.steps = 10**9
        e = await refused(address, PROGRESS, req, md)
        assert e.code() == grpc.StatusCode.UNAUTHENTICATED and "bad signature" in e.details()

    run(body)


def test_a_replayed_call_and_a_skewed_clock_are_refused():
    async def body(core, address):
        me = identity()
        md = Signer(me).metadata(HEALTH, b"")
        await raw_call(address, HEALTH, pb.HealthRequest(), md)
        e = await refused(address, HEALTH, pb.HealthRequest(), md)
        assert e.code() == grpc.StatusCode.UNAUTHENTICATED and "replayed call" in e.details()
        for skew in (-120.0, 120.0):
            md = Signer(me, clock=lambda s=skew: time.time() + s).metadata(HEALTH, b"")
            e = await refused(address, HEALTH, pb.HealthRequest(), md)
            assert f"stamped {skew:+.1f} s" in e.details() and "fix the clock" in e.details()
        late = Signer(me, clock=lambda: time.time() + 20).metadata(HEALTH, b"")   # within the 30 s bound
        assert (await raw_call(address, HEALTH, pb.HealthRequest(), late)).peer_id == core.peer_id

    run(body)


def test_a_call_claiming_another_peers_id_is_refused():
    async def body(core, address):
        me, victim = identity(), identity()
        channels = Channels(Signer(me))
        try:
            stub = channels.stub(address)
            req = pb.ProgressRequest(run_id="auth", spec_hash=core.spec_hash, round=0, peer_id=victim.peer_id, steps=5)
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.Progress(req, timeout=5)
            assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "claims to come from" in e.value.details() and "speaks only for itself" in e.value.details()
            req.peer_id = me.peer_id
            await stub.Progress(req, timeout=5)   # its own claim is answered
            dial = pb.DialBackRequest(peer_id=victim.peer_id, grpc_address=address)
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.DialBack(dial, timeout=5)
            assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        finally:
            await channels.close()

    run(body)


def test_a_private_run_refuses_calls_without_its_secret_and_says_so_once():
    async def main():
        core, server, address = await serving(secret="s3cret-of-the-run")
        lines: list[str] = []
        try:
            for secret, why in (("", SECRET_MISSING), ("not-the-secret", SECRET_REFUSED)):
                channels = Channels(Signer(identity(), secret))
                channels.signer.on_refused = lines.append
                try:
                    with pytest.raises(grpc.aio.AioRpcError) as e:
                        await channels.stub(address).Health(pb.HealthRequest(), timeout=5)
                    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED and why in e.value.details()
                    await asyncio.sleep(0.05)   # the refusal reaches on_refused from the call's done callback
                finally:
                    await channels.close()
            assert lines == [describe_secret_refusal(SECRET_MISSING), describe_secret_refusal(SECRET_REFUSED)]
            assert all("s3cret" not in line for line in lines)
            good = Channels(Signer(identity(), "s3cret-of-the-run"))
            try:
                assert (await good.stub(address).Health(pb.HealthRequest(), timeout=5)).peer_id == core.peer_id
            finally:
                await good.close()
        finally:
            await server.stop(None)
            await core.channels.close()

    asyncio.run(main())
