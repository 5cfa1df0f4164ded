"""A TLS run of real peer processes, private too as README advises (TLS guards the calls, the secret
the DHT records): two peers with certificates of the run's CA (made by `peer tls`) and the secret
train together (no chunk nor reply MAC: TLS does their work); a peer without certificates is told in one line and exits 2, one with another CA's
certificate in one line and exits 3; a plain gRPC client gets no answer from a TLS peer, where a
client with the run CA's certificate does; `peer doctor` passes with a peer's files, and without
them says the run uses TLS."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import grpc
import pytest

from peer._proto import peer_pb2 as pb
from peer._proto import peer_pb2_grpc
from peer.config import PeerConfig
from peer.net.core import NetCore
from tests.fixtures import identity
from tests.procs import python_module, wait_for_line
from tests.swarm.harness import Swarm

SECRET = "a-long-run-secret-0123456789"
RUN = ["--model", "tiny", "--target-steps", "40", "--max-round-seconds", "30", "--min-peers", "2",
       "--batch-size", "4", "--eval-batches", "1", "--join-window-s", "5"]
pytestmark = pytest.mark.timeout(300)


def tls(folder: Path) -> list[str]:
    return ["--tls-cert", str(folder / "peer.pem"), "--tls-key", str(folder / "peer.key"),
            "--tls-ca", str(folder / "ca.pem")]


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    root = tmp_path_factory.mktemp("tls")
    for args in (["init-ca", str(root / "ca")], ["init-ca", str(root / "other-ca")],
                 ["issue", "--ca", str(root / "ca"), "--out", str(root / "a")],
                 ["issue", "--ca", str(root / "ca"), "--out", str(root / "b")],
                 ["issue", "--ca", str(root / "other-ca"), "--out", str(root / "c")]):
        done = subprocess.run(python_module("peer.cli", "tls", *args), capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
    (root / "secret.txt").write_text(SECRET + "\n")
    s = Swarm(root, RUN)
    try:
        s.start_bootstrap()
        s.start_peer("a", ["--max-rounds", "400", *tls(root / "a")], {"DILOCO_RUN_SECRET": SECRET})
        s.start_peer("b", ["--max-rounds", "400", *tls(root / "b"), "--run-secret-file", str(root / "secret.txt")])
        s.wait_rounds("a", 2, 120)
        yield s
    finally:
        s.stop_all()


def test_the_peers_with_the_runs_certificates_train_together(swarm):
    rows = swarm.wait_rounds("b", 2, 120)
    assert [r for r in rows if r["outcome"] == "applied" and r["group_size"] == 2]
    a, b = swarm.by_round("a"), swarm.by_round("b")
    assert all(a[r]["digest"] == b[r]["digest"] for r in set(a) & set(b))
    for name in ("a", "b"):
        assert "MAC" not in swarm.log(name) and SECRET not in swarm.log(name)


@pytest.mark.parametrize("name, extra, status, says", [
    ("plain", [], 2, "this run uses TLS (its CA has sha256"),
    ("other-ca", "c", 3, "this run's peers use another TLS CA"),
])
def test_a_peer_that_does_not_fit_the_runs_tls_is_told_in_one_line(swarm, name, extra, status, says):
    swarm.start_peer(name, ["--max-rounds", "3", *(tls(Path(swarm.root) / extra) if extra else [])])
    assert swarm.wait_exit(name, 120) == status, swarm.log(name)
    errors = [line for line in swarm.log(name).splitlines() if " ERROR " in line]
    assert len(errors) == 1 and says in errors[0], errors
    assert not swarm.metrics(name), "it trained no round with the run"


def test_a_plain_grpc_client_gets_no_answer_from_a_tls_peer(swarm):
    port = wait_for_line(swarm.root / "a.log", r"gRPC server listens on 127\.0\.0\.1:(\d+)", 30).group(1)
    address = f"127.0.0.1:{port}"

    async def body():
        async with grpc.aio.insecure_channel(address) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await peer_pb2_grpc.PeerStub(ch).Health(pb.HealthRequest(), timeout=5)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        folder = Path(swarm.root) / "b"   # the same call with the run CA's certificate is answered
        member = NetCore(None, PeerConfig(tls_cert=str(folder / "peer.pem"), tls_key=str(folder / "peer.key"),  # type: ignore[arg-type]
                                          tls_ca=str(folder / "ca.pem"), run_secret=SECRET), identity())
        try:
            reply = await member.channels.stub(address).Health(pb.HealthRequest(), timeout=5)
            assert reply.peer_id and reply.run_id == "diloco"
        finally:
            await member.channels.close()

    asyncio.run(body())


@pytest.mark.parametrize("with_tls", [True, False], ids=["tls", "plain"])
def test_peer_doctor_checks_a_tls_run_with_its_files(swarm, with_tls):
    args = ["--initial-peers", swarm.bootstrap_addr, "--host", "127.0.0.1", "--dht-host-maddrs",
            "/ip4/127.0.0.1/tcp/0", "--run-secret-file", str(swarm.root / "secret.txt"),
            *(tls(Path(swarm.root) / "b") if with_tls else [])]
    p = subprocess.run(python_module("peer.cli", "doctor", *args), capture_output=True, text=True, timeout=120)
    if with_tls:
        assert p.returncode == 0, p.stdout + p.stderr[-3000:]
        assert "[  ok] gRPC port" in p.stdout and "[  ok] link" in p.stdout, p.stdout
    else:
        assert p.returncode == 1 and "[FAIL] run       diloco: this run uses TLS" in p.stdout, p.stdout
