"""TLS (peer.tlsfiles, --tls-cert/--tls-key/--tls-ca): `peer tls` makes a CA and peer certificates;
the files are checked at start (exit 2 naming the flag: one flag alone, unreadable, not PEM, another
certificate's key, another CA, expired); over real gRPC a TLS peer answers a peer of its CA (also on
the dial-back's fresh channel), and gives no answer to a plain client nor to another CA's; a run's
spec carries its CA's fingerprint, and a peer that does not fit it gets exit 2 or 3; under TLS chunks
carry no MAC."""

from __future__ import annotations

import asyncio
import datetime
from pathlib import Path

import grpc
import pytest

from peer import tlsfiles
from peer._proto import peer_pb2 as pb
from peer._proto import peer_pb2_grpc
from peer.cli import main as peer_main
from peer.cli import parse_config
from peer.config import EXIT_AUTH, EXIT_CONFIG, ConfigError, PeerConfig, RunSpec, tls_conflict
from peer.net.core import NetCore
from peer.net.reach import dial
from peer.net.server import start_server
from tests.fixtures import identity

pytestmark = pytest.mark.timeout(60)
SECRET = "a-long-run-secret-0123456789"


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """Two CAs (run, other) and peers a, b of the run's CA, c of the other's; an expired peer of the run's."""
    root = tmp_path_factory.mktemp("pki")
    assert tlsfiles.main(["init-ca", str(root / "run")]) == 0
    assert tlsfiles.main(["init-ca", str(root / "other")]) == 0
    for name in ("a", "b"):
        assert tlsfiles.main(["issue", "--ca", str(root / "run"), "--out", str(root / name)]) == 0
    assert tlsfiles.main(["issue", "--ca", str(root / "other"), "--out", str(root / "c")]) == 0
    old = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=40)
    tlsfiles.issue(root / "run", root / "expired", days=30, valid_from=old)
    return root


def flags(folder: Path) -> list[str]:
    return ["--tls-cert", str(folder / "peer.pem"), "--tls-key", str(folder / "peer.key"),
            "--tls-ca", str(folder / "ca.pem")]


def cfg(folder: Path | None, secret: str = "") -> PeerConfig:
    if folder is None:
        return PeerConfig(run_id="tls", run_secret=secret)
    return PeerConfig(run_id="tls", run_secret=secret, tls_cert=str(folder / "peer.pem"),
                      tls_key=str(folder / "peer.key"), tls_ca=str(folder / "ca.pem"))


def test_peer_tls_makes_files_that_load_and_keeps_secrets_private(pki):
    a = tlsfiles.load(*(str(pki / "a" / n) for n in ("peer.pem", "peer.key", "ca.pem")))
    assert a.ca_sha256 == tlsfiles.load(*(str(pki / "b" / n) for n in ("peer.pem", "peer.key", "ca.pem"))).ca_sha256
    assert (pki / "a" / "peer.key").stat().st_mode & 0o777 == 0o600 and (pki / "run" / "ca.key").stat().st_mode & 0o777 == 0o600
    assert "PRIVATE" not in repr(a)
    assert tlsfiles.main(["init-ca", str(pki / "run")]) == EXIT_CONFIG, "never overwrites a CA"
    c, _ = parse_config(flags(pki / "a"))
    assert c.spec.tls_ca == a.ca_sha256, "the CA's fingerprint is the run spec's"


@pytest.mark.parametrize("bad, says", [
    (lambda p: ["--tls-cert", str(p / "a" / "peer.pem")], "--tls-cert without the rest"),
    (lambda p: [*flags(p / "a")[:4], "--tls-ca", str(p / "nope.pem")], "--tls-ca: cannot read"),
    (lambda p: [*flags(p / "a")[:4], "--tls-ca", str(p / "a" / "peer.key")], "is not a PEM certificate"),
    (lambda p: [*flags(p / "a")[:2], "--tls-key", str(p / "b" / "peer.key"), *flags(p / "a")[4:]],
     "is not the key of the certificate"),
    (lambda p: [*flags(p / "c")[:4], "--tls-ca", str(p / "a" / "ca.pem")], "was not issued by the CA"),
    (lambda p: flags(p / "expired"), "expired on"),
])
def test_bad_tls_files_stop_the_peer_with_exit_2_and_one_line(pki, bad, says, capsys):
    with pytest.raises(ConfigError, match=says.replace("(", r"\(")):
        parse_config(bad(pki))
    assert peer_main(bad(pki)) == EXIT_CONFIG
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0], err


def test_a_peer_that_does_not_fit_the_runs_tls_gets_exit_2_or_3():
    run, other = RunSpec(tls_ca="a" * 64), RunSpec(tls_ca="b" * 64)
    assert tls_conflict(run, run) is None and tls_conflict(RunSpec(), RunSpec()) is None
    assert tls_conflict(run, RunSpec())[0] == EXIT_CONFIG and "this run uses TLS" in tls_conflict(run, RunSpec())[1]
    assert tls_conflict(RunSpec(), run)[0] == EXIT_CONFIG
    assert tls_conflict(run, other)[0] == EXIT_AUTH and "another TLS CA" in tls_conflict(run, other)[1]


async def serving(folder: Path | None, secret: str = "") -> tuple[NetCore, grpc.aio.Server, str]:
    core = NetCore(None, cfg(folder, secret), identity())  # type: ignore[arg-type]
    server, port = await start_server(core, "127.0.0.1", 0)
    return core, server, f"127.0.0.1:{port}"


def test_a_tls_peer_answers_its_cas_peers_only(pki):
    async def body():
        core, server, address = await serving(pki / "a")
        b, c = NetCore(None, cfg(pki / "b"), identity()), NetCore(None, cfg(pki / "c"), identity())  # type: ignore
        plain = NetCore(None, cfg(None), identity())  # type: ignore[arg-type]
        try:
            reply = await b.channels.stub(address).Health(pb.HealthRequest(), timeout=5)
            assert reply.peer_id == core.peer_id
            for stranger in (c, plain):   # another CA's certificate; no TLS at all
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await stranger.channels.stub(address).Health(pb.HealthRequest(), timeout=5)
                assert e.value.code() == grpc.StatusCode.UNAVAILABLE, e.value
            async with grpc.aio.insecure_channel(address) as ch:   # a bare client, no signature either
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await peer_pb2_grpc.PeerStub(ch).Health(pb.HealthRequest(), timeout=5)
                assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            # the dial-back's fresh channel speaks TLS too
            ok = await dial(address, "127.0.0.1", core.peer_id, True, 3.0, b.signer, b.tls)
            assert ok.status == pb.DialResult.OK, ok
            plain_dial = await dial(address, "127.0.0.1", core.peer_id, True, 3.0, plain.signer, None)
            assert plain_dial.status != pb.DialResult.OK
        finally:
            await server.stop(None)
            for x in (b, c, plain):
                await x.channels.close()

    asyncio.run(body())


def test_under_tls_chunks_carry_no_mac_but_the_secret_still_guards_calls(pki):
    async def body():
        core, server, address = await serving(pki / "a", SECRET)
        assert not core.signer.macs and NetCore(None, cfg(None, SECRET), identity()).signer.macs  # type: ignore
        b = NetCore(None, cfg(pki / "b"), identity())  # type: ignore[arg-type]   # TLS, but no secret
        try:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await b.channels.stub(address).Health(pb.HealthRequest(), timeout=5)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED and "private" in e.value.details()
        finally:
            await server.stop(None)
            await b.channels.close()

    asyncio.run(body())
