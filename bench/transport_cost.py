"""What a private run's transport costs: the HMAC of a 1 MiB chunk beside the sha256 every shard
stream pays anyway, and, over real gRPC on loopback (a peer's own server and client), a state
download from one donor (every chunk sealed by the donor and checked by the receiver, then the
digest) as a public run, a private run (per-chunk MACs), a TLS run and a TLS run with a secret
(TLS instead of MACs), plus the time to a fresh channel's first call (TCP, and the TLS handshake).
Both ends run in this process, so its CPU seconds per MB (all threads, gRPC's included) are the cost
of both ends together, a figure that holds on a loaded machine where MB/s does not. Prints a table;
not a test.

    .venv/bin/python bench/transport_cost.py [--mb 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import torch  # noqa: E402

from peer._proto import peer_pb2 as pb  # noqa: E402
from peer._proto import peer_pb2_grpc  # noqa: E402
from peer.config import PeerConfig  # noqa: E402
from peer.identity import Identity  # noqa: E402
from peer.net.auth import derived_key  # noqa: E402
from peer.net.chunkmac import ChunkMacs  # noqa: E402
from peer.net.client import CHUNK_BYTES, open_channel  # noqa: E402
from peer.net.core import NetCore  # noqa: E402
from peer.net.loop import Deadline  # noqa: E402
from peer.net.reach import FRESH_OPTIONS  # noqa: E402
from peer.net.server import start_server  # noqa: E402
from peer.net.state_sync import StateSnapshot, download  # noqa: E402
from peer.outer import GlobalState  # noqa: E402

SECRET = "bench-run-secret-0123456789"


def median_ms(fn, repeats: int = 50) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def chunk_costs() -> list[tuple[str, float]]:
    data = bytes(range(256)) * (CHUNK_BYTES // 256)
    chunk = pb.ShardChunk(data=data)
    mac = ChunkMacs(derived_key(SECRET, "chunk-mac")).shard(pb.ShardRequest(round=1, roster_hash="r" * 64), "peer")
    sealed = mac.seal(1, pb.ShardChunk(data=data))
    return [("sha256 of a 1 MiB chunk", median_ms(lambda: hashlib.sha256(data).digest())),
            ("HMAC-SHA256 seal of a 1 MiB chunk", median_ms(lambda: mac.seal(1, chunk))),
            ("HMAC-SHA256 check of a 1 MiB chunk", median_ms(lambda: mac.check(1, sealed)))]


def modes(tls_dir: Path | None) -> dict[str, dict]:
    out = {"public": {}, "private (chunk MACs)": {"run_secret": SECRET}}
    if tls_dir is not None:
        files = tls_files(tls_dir)
        out["TLS"] = files
        out["TLS + secret (no MACs)"] = {**files, "run_secret": SECRET}
    return out


def tls_files(folder: Path) -> dict[str, str]:
    from peer import tlsfiles

    tlsfiles.init_ca(folder / "ca")
    tlsfiles.issue(folder / "ca", folder / "peer")
    return {"tls_cert": str(folder / "peer" / "peer.pem"), "tls_key": str(folder / "peer" / "peer.key"),
            "tls_ca": str(folder / "peer" / "ca.pem")}


async def measure(settings: dict, snap: StateSnapshot, repeats: int) -> tuple[float, float, float]:
    """(MB/s of a whole download from one donor, CPU ms per MB of it (both ends), ms to a fresh
    channel's first Health call, median of 20)."""
    donor = NetCore(None, PeerConfig(run_id="bench", **settings), Identity.generate())  # type: ignore[arg-type]
    donor.snapshot = snap
    me = NetCore(None, PeerConfig(run_id="bench", **settings), Identity.generate())  # type: ignore[arg-type]
    server, port = await start_server(donor, "127.0.0.1", 0)
    address = f"127.0.0.1:{port}"
    try:
        rates, cpus, firsts = [], [], []
        for _ in range(20):   # as the dial-back does: a new connection each time (FRESH_OPTIONS)
            channel = open_channel(address, me.signer, FRESH_OPTIONS, me.tls)
            t = time.perf_counter()
            await peer_pb2_grpc.PeerStub(channel).Health(pb.HealthRequest(), timeout=10)
            firsts.append(time.perf_counter() - t)
            await channel.close(None)
        for _ in range(repeats):
            t, cpu = time.perf_counter(), time.process_time()
            await download(me.channels, [(donor.peer_id, address)], 0, me.peer_id, snap.header.numel, "bench",
                           Deadline(120))
            rates.append(snap.header.num_bytes / (time.perf_counter() - t) / 1e6)
            cpus.append(1000 * (time.process_time() - cpu) / (snap.header.num_bytes / 1e6))
        return statistics.median(rates), statistics.median(cpus), 1000 * statistics.median(firsts)
    finally:
        await server.stop(None)
        await me.channels.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mb", type=int, default=64, help="state size in MB (theta and momentum)")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    for name, ms in chunk_costs():
        print(f"{name:<40} {ms:7.3f} ms  ({CHUNK_BYTES / ms / 1e3:6.0f} MB/s)")
    numel = args.mb * 1_000_000 // 8
    g = torch.Generator().manual_seed(0)
    snap = StateSnapshot.of(GlobalState(torch.randn(numel, generator=g), torch.randn(numel, generator=g), 3, 10),
                            "bench")
    print(f"\nstate download, {snap.header.num_bytes / 1e6:.0f} MB from one donor on loopback, median of "
          f"{args.repeats}:")
    with tempfile.TemporaryDirectory() as folder:
        try:
            from peer import tlsfiles  # noqa: F401
            tls_dir: Path | None = Path(folder)
        except ImportError:
            tls_dir = None
        for name, settings in modes(tls_dir).items():
            rate, cpu_ms, first_ms = asyncio.run(measure(settings, snap, args.repeats))
            print(f"  {name:<26} {rate:7.0f} MB/s  {cpu_ms:5.2f} CPU ms/MB (both ends)   first call on a new "
                  f"channel {first_ms:6.1f} ms")


if __name__ == "__main__":
    main()
