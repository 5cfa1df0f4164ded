"""A newcomer's download of the global state from 1, 2 and 3 donors whose uplinks are capped
(100 Mbit/s by default), each on its own host of a tests/links.py Topology (network namespaces,
tbf caps), the newcomer's downlink uncapped or capped with --newcomer-mbit. Donors are small
processes serving one StateSnapshot (the `base` preset's size by default: 14.4 M parameters,
115 MB of theta + momentum) through the peer's real gRPC server; the newcomer calls
peer.net.state_sync.download with the first n donors. Prints seconds and MB/s per donor
count beside the bound bytes / (n * uplink). Needs root (namespaces). Not a test.

    .venv/bin/python bench/state_download.py [--model base] [--donor-mbit 100] [--newcomer-mbit 0]
                                             [--donors 1 2 3] [--repeats 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests import procs  # noqa: E402
from tests.links import LinksUnavailable, Topology  # noqa: E402

SPEC_HASH = "bench-state-download"
ROUND = 7


def make_state(numel: int):
    """The same state in every donor (a download may resume across donors): seeded values."""
    import torch

    from peer.outer import GlobalState

    gen = torch.Generator().manual_seed(1234)
    theta = torch.randn(numel, generator=gen, dtype=torch.float32)
    momentum = torch.randn(numel, generator=gen, dtype=torch.float32).mul_(0.01)
    return GlobalState(theta=theta, momentum=momentum, round=ROUND, global_samples=12345)


def serve(host: str, numel: int) -> None:
    """Donor: the peer's gRPC server over a NetCore (no DHT) that holds one state to serve."""
    from peer.config import PeerConfig
    from peer.identity import Identity
    from peer.logs import setup_logging
    from peer.net.core import NetCore
    from peer.net.server import start_server
    from peer.net.state_sync import StateSnapshot

    setup_logging("WARNING")
    snapshot = StateSnapshot.of(make_state(numel), SPEC_HASH)

    async def main() -> None:
        core = NetCore(None, PeerConfig(), Identity.generate())
        core.held.put(snapshot)
        server, port = await start_server(core, host, 0)
        print(f"serving {len(snapshot.payload)} bytes on {host}:{port}", flush=True)
        await server.wait_for_termination()

    asyncio.run(main())


def fetch(addresses: list[str], counts: list[int], repeats: int, numel: int) -> None:
    """Newcomer: downloads with the first n donors for each n, `repeats` times; one JSON line each."""
    from peer.identity import Identity
    from peer.logs import setup_logging
    from peer.net.client import Channels
    from peer.net.loop import Deadline
    from peer.net.signer import Signer
    from peer.net.state_sync import download

    setup_logging("INFO")
    donors = [(f"donor{i}", address) for i, address in enumerate(addresses)]

    async def once(n: int) -> float:
        channels = Channels(Signer(Identity.generate()))   # fresh connections for every try
        try:
            started = time.monotonic()
            state = await download(channels, donors[:n], ROUND, "newcomer", numel, SPEC_HASH, Deadline(600))
            took = time.monotonic() - started
        finally:
            await channels.close()
        assert state.round == ROUND and state.theta.numel() == numel
        return took

    for _ in range(repeats):
        for n in counts:
            print(json.dumps({"donors": n, "seconds": asyncio.run(once(n))}), flush=True)


def run(args) -> None:
    from peer.tasks import build_model

    numel = sum(p.numel() for p in build_model(args.model, 0).parameters())
    num_bytes = 8 * numel
    root = Path(args.root or tempfile.mkdtemp(prefix="state-download-"))
    root.mkdir(parents=True, exist_ok=True)
    me = [sys.executable, str(Path(__file__).resolve())]
    topo = Topology()
    started = []
    try:
        addresses = []
        for i in range(max(args.donors)):
            host = topo.add_host(f"donor{i}", up_mbit=args.donor_mbit)
            proc = topo.start(host, [*me, "--serve", host.ip, "--numel", str(numel)], None, root / f"donor{i}.log")
            started.append(proc)
        for proc in started:
            addresses.append(procs.wait_for_line(proc, r"^serving \d+ bytes on (\S+)$", 120).group(1))
        newcomer = topo.add_host("newcomer", down_mbit=args.newcomer_mbit or None)
        proc = topo.start(newcomer, [*me, "--fetch", *addresses, "--counts", *map(str, args.donors),
                                     "--repeats", str(args.repeats), "--numel", str(numel)],
                          None, root / "newcomer.log")
        started.append(proc)
        code = proc.wait(timeout=args.repeats * len(args.donors) * 600)
        log = (root / "newcomer.log").read_text(errors="replace")
        if code != 0:
            raise SystemExit(f"the newcomer exited {code}:\n{procs.log_tail(root / 'newcomer.log')}")
    finally:
        for p in started:
            if p.poll() is None:
                p.kill()
                p.wait(10)
        topo.close()
    times: dict[int, list[float]] = {}
    for line in log.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            times.setdefault(row["donors"], []).append(row["seconds"])
    link_bytes_s = args.donor_mbit * 1e6 / 8
    down = f"{args.newcomer_mbit} Mbit/s" if args.newcomer_mbit else "uncapped"
    print(f"state download: {args.model} preset, {num_bytes / 1e6:.1f} MB; donor uplinks {args.donor_mbit} Mbit/s, "
          f"newcomer downlink {down}; median of {args.repeats}; logs in {root}")
    print(f"  {'donors':>6}  {'seconds':>8}  {'MB/s':>6}  {'bound s':>8}  {'bound MB/s':>10}  {'of bound':>8}  runs")
    for n in args.donors:
        secs = statistics.median(times[n])
        bound_s = num_bytes / (n * link_bytes_s)
        if args.newcomer_mbit:
            bound_s = max(bound_s, num_bytes / (args.newcomer_mbit * 1e6 / 8))
        print(f"  {n:>6}  {secs:>8.2f}  {num_bytes / 1e6 / secs:>6.1f}  {bound_s:>8.2f}  "
              f"{num_bytes / 1e6 / bound_s:>10.1f}  {bound_s / secs:>7.0%}  "
              + " ".join(f"{t:.2f}" for t in times[n]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="base", help="preset whose state size is downloaded (tiny, small, base)")
    ap.add_argument("--donor-mbit", type=float, default=100.0, help="each donor's uplink cap")
    ap.add_argument("--newcomer-mbit", type=float, default=0.0, help="the newcomer's downlink cap (0 = none)")
    ap.add_argument("--donors", type=int, nargs="+", default=[1, 2, 3], help="donor counts to try")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--root", default="", help="logs here (default: a new temp dir)")
    ap.add_argument("--serve", metavar="HOST", help=argparse.SUPPRESS)     # internal: a donor
    ap.add_argument("--fetch", metavar="ADDR", nargs="+", help=argparse.SUPPRESS)   # internal: the newcomer
    ap.add_argument("--counts", type=int, nargs="+", help=argparse.SUPPRESS)
    ap.add_argument("--numel", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(args.serve, args.numel)
    elif args.fetch:
        fetch(args.fetch, args.counts, args.repeats, args.numel)
    else:
        try:
            run(args)
        except LinksUnavailable as e:
            raise SystemExit(f"state_download needs network namespaces: {e}") from None


if __name__ == "__main__":
    main()
