"""One peer of bench/allreduce.py (and bench/scale.py): a real hivemind DHT (peer 0 is the
bootstrap), then, step by step, our averager (a NetCore with its real gRPC server and
member.run_round, per codec), hivemind's DecentralizedAverager on the same DHT and a
torch.distributed gloo all_reduce, each on the same delta (seeded per peer index).

It talks JSON lines with the driver: stdout carries {"ev": "dht", ...} once, then for every
timed step {"ev": "ready", "step": ...}; the driver answers "go" on stdin once every peer is
ready (a barrier, so the peers start together); the worker prints {"ev": "timed"} once it has
its result, the driver answers "go" again once every peer has, and only then does the worker
check the result and print {"ev": "done", ...} with its seconds from the start of the step to
its result, bytes and the error against the exact mean. Logs go to stderr, at WARNING unless ALLREDUCE_LOG (e.g. INFO) says otherwise. Not a
test; run by the driver, not by hand."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import hashlib
import json
import logging
import os
import resource
import signal
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from peer.hostmem import use_huge_pages  # noqa: E402

HUGE_PAGES = use_huge_pages(os.environ.get("DILOCO_HUGE_PAGES", "on"))   # as a peer does (--huge-pages)
import torch  # noqa: E402

from peer.codecs import get_codec  # noqa: E402
from peer.config import PeerConfig, RunSpec, wire_codec  # noqa: E402
from peer.dht import create_dht  # noqa: E402
from peer.identity import Identity  # noqa: E402
from peer.net import allreduce as ar  # noqa: E402
from peer.net import group, member, swarm  # noqa: E402
from peer.net.core import NetCore  # noqa: E402
from peer.net.node import visible_maddrs  # noqa: E402
from peer.net.server import start_server  # noqa: E402
from peer.net.state_sync import StateSnapshot  # noqa: E402
from peer.outer import GlobalState  # noqa: E402

log = logging.getLogger("allreduce_worker")
VIEW_TIMEOUT_S = 60.0    # the others' records must show up in our view within this
STEP_TIMEOUT_S = 300.0   # one hivemind step at most
TRACE_EVERY_S = 0.02     # --trace: the link's counters are read this often (a 100 Mbit/s link moves 250 kB)


def delta_of(index: int, numel: int) -> torch.Tensor:
    """Peer `index`'s fixed pseudo-gradient: every worker can rebuild every peer's."""
    return torch.randn(numel, generator=torch.Generator().manual_seed(1000 + index)).mul_(1e-2)


def exact_mean(k: int, numel: int) -> torch.Tensor:
    acc = torch.zeros(numel, dtype=torch.float64)
    for i in range(k):
        acc += delta_of(i, numel).double()
    return acc.div_(k).float()


def descendants() -> tuple[int, ...]:
    """This process and every process below it (its DHT process and p2pd, hivemind's averager)."""
    parents = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parents[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError):   # gone meanwhile
                pass
    mine, grew = {os.getpid()}, True
    while grew:
        found = {pid for pid, parent in parents.items() if parent in mine} - mine
        mine |= found
        grew = bool(found)
    return tuple(sorted(mine))


def cpu_s(pids: tuple[int, ...]) -> float:
    """CPU seconds (user + system, every thread) that `pids` used so far, from /proc (10 ms ticks)."""
    total = 0
    for pid in pids:
        try:
            f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(f[11]) + int(f[12])   # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def tx_rx_bytes(iface: str) -> tuple[int, int]:
    """Bytes sent and received on `iface` of this process's network namespace (0, 0 if absent)."""
    for line in Path("/proc/net/dev").read_text().splitlines()[2:]:
        name, _, rest = line.partition(":")
        if name.strip() == iface:
            f = rest.split()
            return int(f[8]), int(f[0])
    return 0, 0


class LinkTrace:
    """The interface's byte counters sampled every TRACE_EVERY_S on a thread of its own while a
    step runs (--trace): [seconds since the start, bytes sent, bytes received] from 0, so the
    driver can show when a peer's link idled within a round."""

    def __init__(self, iface: str):
        self.iface, self.samples, self._stop = iface, [], threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, t0: float) -> None:
        tx0, rx0 = tx_rx_bytes(self.iface)
        self.samples, self._stop = [[0.0, 0, 0]], threading.Event()

        def sample() -> None:
            while not self._stop.wait(TRACE_EVERY_S):
                tx, rx = tx_rx_bytes(self.iface)
                self.samples.append([round(time.perf_counter() - t0, 4), tx - tx0, rx - rx0])
        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()

    def stop(self) -> list[list[float]]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        return self.samples


class Worker:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.k, self.numel, self.index = args.k, args.numel, args.index
        self.delta = delta_of(self.index, self.numel)
        self.pids = descendants()   # whose CPU seconds a step counts (the DHT and averager run already)
        self.mean = exact_mean(self.k, self.numel)

    def say(self, **msg) -> None:
        sys.stdout.write(json.dumps(msg) + "\n")
        sys.stdout.flush()

    async def barrier(self, step: str) -> None:
        """Says we are ready for `step` and waits for the driver's go (it has a deadline there)."""
        self.say(ev="ready", step=step)
        line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        if line.strip() != "go":
            raise SystemExit(f"peer {self.index}: the driver said {line.strip()!r}, not go, before {step}")

    async def report(self, step: str, seconds: float, avg: torch.Tensor | None, before: tuple[int, int],
                     sent: int = 0, received: int = 0, kind: str = "applied", cpu: float = float("nan"),
                     **extra: float) -> None:
        """Says the step is timed, waits until every peer is (the driver's second go), then checks the
        result: a peer that finished first must not spend the slower ones' cores on the bench's own
        error and hash of the whole average while their step is still being timed."""
        tx, rx = tx_rx_bytes(self.args.iface)
        self.say(ev="timed", step=step)
        line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        if line.strip() != "go":
            raise SystemExit(f"peer {self.index}: the driver said {line.strip()!r}, not go, after {step}")
        err = float((avg - self.mean).abs().max()) if avg is not None else float("nan")
        sha = hashlib.sha256(avg.numpy().tobytes()).hexdigest()[:16] if avg is not None else ""
        self.say(ev="done", step=step, s=seconds, cpu=cpu, kind=kind, sent=sent, received=received,
                 tx=tx - before[0], rx=rx - before[1], err=err, sha=sha,
                 rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, **extra)

    # ---- ours -------------------------------------------------------------------------------
    async def ours(self, dht, codec: str, sizing: str = "rate") -> None:
        sized = {} if sizing == "rate" else {"shard_sizing": sizing}   # rate: the default, and all older code knows
        spec = RunSpec(codec="sparse" if codec.startswith("sparse") else codec, **sized)
        run_id = f"ab-{self.args.tag}-{codec.replace(':', '-')}-{sizing}"
        core = NetCore(dht, PeerConfig(run_id=run_id), self.args.identity)
        core.spec, core.spec_hash, core.numel = spec, spec.hash(), self.numel
        core.reach.settled = True    # loopback or one bridge: everyone dials everyone
        tiny = GlobalState(torch.zeros(1), torch.zeros(1), 0, 0)
        core.snapshot = StateSnapshot.of(tiny, core.spec_hash)   # a state held: our record counts as ready
        server, port = await start_server(core, self.args.ip, 0)
        core.address = f"{self.args.ip}:{port}"
        refresher = asyncio.ensure_future(core.refresh_forever())
        name = wire_codec(spec)
        marks: dict[str, float] = {}
        join, send_and_fetch, commit = group.join_round, member.send_and_fetch, member.commit

        def timed(call, began: str, ended: str):   # the same call, with when it began and ended noted
            async def run(*a, **kw):
                marks[began] = time.perf_counter()
                try:
                    return await call(*a, **kw)
                finally:
                    marks[ended] = time.perf_counter()
            return run
        # what member.run_round calls (this process runs one peer)
        group.join_round = timed(join, "join", "joined")
        member.send_and_fetch = timed(send_and_fetch, "moving", "moved")
        member.commit = timed(commit, "commit", "committed")
        trace = LinkTrace(self.args.iface) if self.args.trace else None
        try:
            for r in range(self.args.rounds):
                core.round, core.steps, core.samples, core.training, core.grant = r, 0, 0, False, None
                core.phase = swarm.AVERAGE
                await self.wait_for_view(core, r)
                step = f"ours {name}" + ("" if sizing == "rate" else f" {sizing}-shards")
                await self.barrier(step)
                before, cpu = tx_rx_bytes(self.args.iface), cpu_s(self.pids)
                marks.clear()
                started = time.perf_counter()
                if trace is not None:
                    trace.start(started)
                out = await member.run_round(core, r, self.delta, 1.0, 1, (0.0, -1))
                seconds = time.perf_counter() - started
                phases = {"cpu": cpu_s(self.pids) - cpu, "owned": owned_share(out, core.peer_id),
                          # from the start: DHT refresh, group agreement, shards moved, leader's decision
                          "marks": {k: v - started for k, v in marks.items()}}
                if "joined" in marks:
                    phases.update(refresh_s=marks["join"] - started, join_s=marks["joined"] - marks["join"],
                                  transfer_s=marks.get("moved", marks["joined"]) - marks["joined"],
                                  commit_s=started + seconds - marks.get("moved", marks["joined"]))
                if trace is not None:
                    phases["trace"] = trace.stop()
                if out.kind != "applied":
                    log.warning("round %d (%s): %s: %s", r, name, out.kind, out.reason)
                await self.report(step, seconds, out.avg if out.kind == "applied" else None, before,
                                  out.bytes_sent, out.bytes_received, out.kind, **phases)
                if out.kind == "applied":   # as the keeper does after the round: its error feedback
                    ar.apply_residuals(core.ef, get_codec(name), out.residuals)
                    ar.apply_residuals(core.owner_ef, get_codec(name), out.owner_residuals)
        finally:
            group.join_round, member.send_and_fetch, member.commit = join, send_and_fetch, commit
            if trace is not None:
                trace.stop()
            refresher.cancel()
            await server.stop(1.0)
            await core.channels.close()

    async def wait_for_view(self, core: NetCore, r: int) -> None:
        """Publishes round r and waits until the view holds every other peer at round r (ready)."""
        deadline = time.monotonic() + VIEW_TIMEOUT_S
        while True:
            await core.refresh()
            there = [p for p in core.live_peers(r) if p.ready()]
            if len(there) >= self.k - 1:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"peer {self.index}: {len(there)} of {self.k - 1} others at round {r} "
                                   f"in the view after {VIEW_TIMEOUT_S:.0f} s")
            await asyncio.sleep(0.2)

    # ---- hivemind ---------------------------------------------------------------------------
    async def hivemind(self, averager) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(self.args.rounds):
            with averager.get_tensors() as tensors:
                tensors[0].copy_(self.delta)
            await self.barrier("hivemind")
            before, cpu = tx_rx_bytes(self.args.iface), cpu_s(self.pids)
            started = time.perf_counter()
            try:
                group = await loop.run_in_executor(None, lambda: averager.step(timeout=STEP_TIMEOUT_S))
            except Exception as e:  # a failed step is a failed round in the table, not the end of the run
                log.warning("hivemind step failed: %r", e)
                group = None
            seconds = time.perf_counter() - started
            cpu = cpu_s(self.pids) - cpu
            with averager.get_tensors() as tensors:
                avg = tensors[0].clone()
            await self.report("hivemind", seconds, avg if group is not None else None, before,
                              kind="applied" if group is not None else "failed", cpu=cpu)

    # ---- gloo -------------------------------------------------------------------------------
    async def gloo(self) -> None:
        import torch.distributed as dist
        dist.init_process_group("gloo", init_method=f"tcp://{self.args.gloo}", rank=self.index, world_size=self.k,
                                timeout=datetime.timedelta(seconds=120))
        try:
            for _ in range(self.args.rounds):
                buf = self.delta.clone()
                await self.barrier("gloo")
                before, cpu = tx_rx_bytes(self.args.iface), cpu_s(self.pids)
                started = time.perf_counter()
                dist.all_reduce(buf)
                buf.div_(self.k)
                seconds = time.perf_counter() - started
                await self.report("gloo", seconds, buf, before, cpu=cpu_s(self.pids) - cpu)
        finally:
            dist.destroy_process_group()


def owned_share(out, peer_id: str) -> float:
    """The share of the state whose shards this peer owned in the round (NaN without a roster)."""
    if out.roster is None:
        return float("nan")
    b = out.roster.shard_bounds
    return sum(b[j + 1] - b[j] for j, o in enumerate(out.roster.owners) if o == peer_id) / out.roster.numel


def make_averager(dht, args: argparse.Namespace):
    from hivemind.averaging import DecentralizedAverager
    return DecentralizedAverager([torch.zeros(args.numel)], dht, start=True, prefix=f"ab{args.tag}",
                                 target_group_size=args.k, min_group_size=args.k, min_matchmaking_time=5.0,
                                 request_timeout=3.0)


async def run(args: argparse.Namespace, dht, averager) -> None:
    w = Worker(args)
    for codec in args.codecs:
        for sizing in args.shard_sizing:
            await w.ours(dht, codec, sizing)
    if averager is not None:
        await w.hivemind(averager)
    if "gloo" in args.backends:
        await w.gloo()
    w.say(ev="end")


def main() -> None:
    ap = argparse.ArgumentParser(description="one peer of bench/allreduce.py (started by it)")
    ap.add_argument("--index", type=int, required=True)
    ap.add_argument("--k", type=int, required=True)
    ap.add_argument("--numel", type=int, required=True)
    ap.add_argument("--rounds", type=int, required=True)
    ap.add_argument("--ip", required=True, help="our address: DHT, gRPC and gloo listen on it")
    ap.add_argument("--iface", default="lo", help="interface whose byte counters are read")
    ap.add_argument("--boot", default="", help="peer 0's DHT multiaddr (empty for peer 0)")
    ap.add_argument("--gloo", default="", help="host:port of gloo's rendezvous (peer 0 listens)")
    ap.add_argument("--tag", required=True, help="names this run's DHT keys")
    ap.add_argument("--codecs", nargs="*", default=[], help="wire codec names for our averager")
    ap.add_argument("--shard-sizing", nargs="+", default=["rate"], help="our run spec's shard_sizing values, each a step")
    ap.add_argument("--backends", nargs="*", default=[], help="hivemind and/or gloo")
    ap.add_argument("--trace", action="store_true", help="sample the link's byte counters during our steps")
    args = ap.parse_args()
    # SIGTERM (the driver's stop) unwinds through the finally blocks below: with the default action the
    # worker died at once and hivemind's averager process, forked from it, lived on as an orphan
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    logging.basicConfig(level=os.environ.get("ALLREDUCE_LOG", "WARNING").upper(), stream=sys.stderr,
                        format=f"%(asctime)s p{args.index} %(name)s %(levelname)s %(message)s")
    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", args.iface)
    args.identity = Identity.generate()
    dht = create_dht(initial_peers=[args.boot] if args.boot else [], host_maddrs=[f"/ip4/{args.ip}/tcp/0"],
                     identity=args.identity)
    try:
        # the averager's process is forked before any gRPC channel or server exists here
        averager = make_averager(dht, args) if "hivemind" in args.backends else None
        w_maddrs = [str(m) for m in visible_maddrs(dht)]
        sys.stdout.write(json.dumps({"ev": "dht", "maddrs": w_maddrs}) + "\n")
        sys.stdout.flush()
        try:
            asyncio.run(run(args, dht, averager))
        finally:
            if averager is not None:
                averager.shutdown()
    finally:
        dht.shutdown()


if __name__ == "__main__":
    main()
