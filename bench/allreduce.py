"""Seconds per round of our averager (member.run_round, every codec) beside hivemind's
DecentralizedAverager and torch.distributed gloo all_reduce: k worker processes
(bench/allreduce_worker.py, one torch thread each, each with its own hivemind DHT; peer 0 is
the bootstrap), the same float32 delta per peer (seeded by its index), the same run. Each
round starts at a barrier across the peers; a round's time is its slowest peer's, from the
start of the step to its result. Prints, per backend, the median, min and max over the rounds,
bytes sent per peer and the max abs error against the exact mean (float64 sum over the same
seeds; with our lossy codecs the error feedback carries over rounds as in a peer, so the
error is a round's real one, not one encoding's; "err round 0" is one encoding's), and the
share (%, median) of the state the last peer's shards held (with --slow-peer, the slow one), the
workers' peak RSS so far (monotonic over a worker's life: a backend run later shows only a
higher peak; it includes the bench's own deltas and exact mean), and for ours "join s", the
slowest peer's DHT refresh and group agreement before its first shard moves (median).

--net netns puts each peer in its own network namespace, a veth to a bridge, both directions
capped with tc tbf at --mbit (tests/links.py), bytes read from the namespace's eth0 (all a
peer sent, its DHT's included; on loopback the counters hold every process's traffic, so only
our Outcome.bytes_sent is shown there, and "-" for hivemind and gloo), and prints
measured / bound, bound = 2 (k-1)/k * payload / link (a codec's encoded payload). --slow-peer
adds a run where the last peer's link is a quarter of the others', where ours runs once with
shards sized by upload rate (the default) and once with equal shards (`--shard-sizing equal`, a
row "ours CODEC equal-shards"); its bound is that peer's own payload at its rate (owning no shard,
it still sends and receives one whole payload).
"xfer s" and "commit s" split the slowest peer's round after the group agreement: shards moved
(sent, reduced, pulled, decoded) and the leader's decision. --trace samples each peer's link
counters every 20 ms during our steps and prints, for each step's median round, every peer's
send and receive rate as a row of characters over the round (a full block: the link's cap) with
the phases marked, and the share of its uplink the shard transfer used: where a link idled.
Needs root, `ip` and `tc`. Prints tables; not a test.

    .venv/bin/python bench/allreduce.py [--k 2 4 8] [--mib 16 64] [--rounds 5] [--codecs fp32 int8]
                                        [--backends ours hivemind gloo] [--net netns --mbit 100 --slow-peer]
                                        [--shard-sizing rate equal]
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import secrets
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from peer.codecs import CODECS, get_codec  # noqa: E402
from peer.config import RunSpec, wire_codec  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from local_swarm import stop_all  # noqa: E402

WORKER = Path(__file__).resolve().parent / "allreduce_worker.py"
START_TIMEOUT_S = 180.0   # a worker's DHT (and its exact mean) is up within this
GLOO_PORT = 29500         # in a namespace of its own, peer 0's gloo rendezvous port is free


def default_codecs() -> list[str]:
    return [*CODECS, wire_codec(RunSpec(codec="sparse"))]


@dataclass
class Run:
    """The per-round, per-peer results of one swarm, by step (e.g. "ours int8", "gloo")."""

    k: int
    numel: int
    caps: list[float | None]
    steps: dict[str, list[list[dict]]] = field(default_factory=dict)


class Peers:
    """k worker processes, started and barrier-stepped by JSON lines over their pipes; every
    wait has a deadline. `topo` (a tests.links.Topology) puts each in its own namespace."""

    def __init__(self, k: int, numel: int, rounds: int, codecs: list[str], backends: list[str],
                 log_dir: Path, topo=None, caps: list[float | None] | None = None, step_timeout_s: float = 600,
                 sizings: tuple[str, ...] = ("rate",), trace: bool = False):
        self.k, self.topo, self.step_timeout_s = k, topo, step_timeout_s
        self.lines: list[queue.Queue] = [queue.Queue() for _ in range(k)]   # each peer's lines, in order
        self.procs: list[subprocess.Popen] = []
        self.logs = [log_dir / f"peer{i}.log" for i in range(k)]
        self.caps = caps or [None] * k
        tag = secrets.token_hex(3)
        hosts = [topo.add_host(f"p{i}", self.caps[i], self.caps[i]) for i in range(k)] if topo else []
        ips = [h.ip for h in hosts] if topo else ["127.0.0.1"] * k
        gloo = f"{ips[0]}:{GLOO_PORT if topo else free_port()}"
        base = [sys.executable, str(WORKER), "--k", str(k), "--numel", str(numel), "--rounds", str(rounds),
                "--iface", "eth0" if topo else "lo", "--gloo", gloo, "--tag", tag,
                "--codecs", *(codecs if "ours" in backends else []), "--shard-sizing", *sizings,
                "--backends", *backends, *(["--trace"] if trace else [])]
        boot = ""
        for i in range(k):
            argv = [*base, "--index", str(i), "--ip", ips[i], "--boot", boot]
            self.start(i, topo.argv(hosts[i], argv) if topo else argv)
            if i == 0:
                got = self.expect({0}, "dht", START_TIMEOUT_S)[0]
                boot = next(m for m in got["maddrs"] if f"/{ips[0]}/" in m)
        self.expect(set(range(1, k)), "dht", START_TIMEOUT_S)

    def start(self, i: int, argv: list[str]) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        with open(self.logs[i], "wb") as err:
            p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, env=env,
                                 cwd=ROOT, text=True)
        self.procs.append(p)

        def pump() -> None:
            for line in p.stdout:
                self.lines[i].put(line)
            self.lines[i].put(None)
        threading.Thread(target=pump, daemon=True).start()

    def expect(self, who: set[int], ev: str, timeout_s: float, also: str = "") -> dict[int, dict]:
        """The next line of each of `who`, all of event `ev` (or `also`); raises with the log tail otherwise."""
        got: dict[int, dict] = {}
        deadline = time.monotonic() + timeout_s
        for i in sorted(who):
            try:
                line = self.lines[i].get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"peer {i} sent no {ev!r} within {timeout_s:.0f} s; "
                                   f"its log:\n{self.tail(i)}") from None
            if line is None:
                raise RuntimeError(f"peer {i} exited ({self.procs[i].wait(10)}) waiting for {ev!r}; "
                                   f"its log:\n{self.tail(i)}")
            msg = json.loads(line)
            if msg["ev"] not in (ev, also):
                raise RuntimeError(f"peer {i} said {msg} while {ev!r} was expected")
            got[i] = msg
        return got

    def tail(self, i: int, n: int = 30) -> str:
        return "\n".join(self.logs[i].read_text(errors="replace").splitlines()[-n:])

    def run(self, out: Run) -> Run:
        """Barrier after barrier until every peer says end: one step of all peers at a time."""
        everyone = set(range(self.k))
        while True:
            first = self.expect(everyone, "ready", self.step_timeout_s, also="end")
            ended = sorted(i for i, m in first.items() if m["ev"] == "end")
            if len(ended) == self.k:
                return out
            if ended:
                raise RuntimeError(f"peers {ended} ended while the others are ready for {first[0]}")
            self.go()
            self.expect(everyone, "timed", self.step_timeout_s)
            self.go()   # every peer has its result: now each checks it (off the clock)
            done = self.expect(everyone, "done", self.step_timeout_s)
            step = done[0]["step"]
            out.steps.setdefault(step, []).append([done[i] for i in sorted(done)])

    def go(self) -> None:
        for p in self.procs:
            p.stdin.write("go\n")
            p.stdin.flush()

    def close(self) -> None:
        stop_all(self.procs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def swarm_run(k: int, numel: int, args: argparse.Namespace, log_dir: Path, caps: list[float | None],
              sizings: tuple[str, ...] = ("rate",)) -> Run:
    """One swarm of k workers on loopback, or in namespaces with `caps` (Mbit/s per peer); ours runs
    once per run-spec shard sizing in `sizings` (a step each: "ours int8", "ours int8 equal-shards")."""
    topo = None
    if args.net == "netns":
        from tests.links import Topology
        topo = Topology("ab")
    peers = None
    try:
        peers = Peers(k, numel, args.rounds, args.codecs, args.backends, log_dir, topo, caps, args.step_timeout,
                      sizings, args.trace)
        return peers.run(Run(k, numel, caps))
    finally:
        if peers is not None:
            peers.close()
        if topo is not None:
            topo.close()


def payload_bytes(step: str, numel: int) -> int:
    """The encoded payload of one peer's whole delta: our codec's, else fp32."""
    return get_codec(step.split()[1]).encoded_size(numel) if step.startswith("ours ") else 4 * numel


def bound_s(step: str, run: Run) -> float | None:
    """The bandwidth bound: 2 (k-1)/k * payload / link; with a slow peer, its payload at its rate."""
    if run.caps[0] is None:
        return None
    payload = payload_bytes(step, run.numel)
    slowest = min(c for c in run.caps if c is not None) * 1e6 / 8
    if len(set(run.caps)) > 1:
        return payload / slowest
    return 2 * (run.k - 1) / run.k * payload / slowest


HEADER = (f"{'backend':22} {'k':>2} {'MiB':>4} {'median s':>9} {'min s':>7} {'max s':>7} {'cpu s/peer':>10} "
          f"{'sent MB/peer':>12} "
          f"{'err round 0':>11} {'max abs err':>11} {'same':>5} {'failed':>6} {'peak GB':>7} {'last owns':>9} "
          f"{'join s':>6} {'xfer s':>6} {'commit s':>8}")


def print_run(run: Run, label: str) -> None:
    netns = run.caps[0] is not None
    print(f"\n{label}")
    print(HEADER + (f" {'bound s':>8} {'x bound':>7}" if netns else ""))
    for step, rounds in run.steps.items():
        ok = [r for r in rounds if all(p["kind"] == "applied" for p in r)]
        times = [max(p["s"] for p in r) for r in rounds]
        if netns or step.startswith("ours "):   # loopback counters hold every process's traffic: ours only
            key = "tx" if netns else "sent"
            sent = f"{statistics.mean(p[key] for r in rounds for p in r) / 1e6:12.2f}"
        else:
            sent = f"{'-':>12}"
        err = max((p["err"] for r in ok for p in r), default=float("nan"))
        first = max(p["err"] for p in rounds[0]) if rounds[0] in ok else float("nan")  # one encoding's
        same = "yes" if all(len({p["sha"] for p in r}) == 1 for r in ok) else "NO"
        med = statistics.median(times)
        line = (f"{step:22} {run.k:2d} {4 * run.numel / 2**20:4.0f} {med:9.3f} {min(times):7.3f} "
                f"{max(times):7.3f} {statistics.median(p['cpu'] for r in rounds for p in r):10.3f} {sent} {first:11.2e} {err:11.2e} {same:>5} {len(rounds) - len(ok):3d}/{len(rounds):<2d}"
                f" {max(p['rss'] for r in rounds for p in r) / 1e9:7.2f}")
        owned = [r[-1]["owned"] for r in rounds if "owned" in r[-1]]
        line += f" {100 * statistics.median(owned):9.1f}" if owned else f" {'-':>9}"
        # ours: the DHT refresh and group agreement before the first shard moves (the slowest peer's)
        joins = [max(p["refresh_s"] + p["join_s"] for p in r) for r in rounds if "join_s" in r[0]]
        line += f" {statistics.median(joins):6.3f}" if joins else f" {'-':>6}"
        for key, width in (("transfer_s", 6), ("commit_s", 8)):   # the slowest peer's, median
            parts = [max(p[key] for p in r) for r in rounds if all(key in p for p in r)]
            line += f" {statistics.median(parts):{width}.3f}" if parts else f" {'-':>{width}}"
        bound = bound_s(step, run)
        if bound is not None:
            line += f" {bound:8.3f} {med / bound:7.2f}"
        print(line, flush=True)
    for step, rounds in run.steps.items():
        if all("trace" in p for p in rounds[0]):
            print_trace(step, run, rounds)


LEVELS = " .:-=+*#@"   # a bin's rate as a share of the link's cap, in ninths


def rate_row(samples: list[list[float]], col: int, t_end: float, bins: int, cap_bps: float) -> str:
    """One character per bin of [0, t_end]: the bytes counter `col` moved in it over the cap's bytes."""
    width = t_end / bins
    moved = [0.0] * bins
    for (t0, *a), (t1, *b) in pairwise(samples):
        if t1 <= t0:
            continue
        rate = (b[col - 1] - a[col - 1]) / (t1 - t0)     # spread evenly over the sample's span
        for i in range(int(t0 / width), min(bins, int(t1 / width) + 1)):
            overlap = min(t1, (i + 1) * width) - max(t0, i * width)
            if overlap > 0:
                moved[i] += rate * overlap
    return "".join(LEVELS[min(len(LEVELS) - 1, int(m / (cap_bps * width) * (len(LEVELS) - 1) + 0.5))]
                   for m in moved)


def sent_at(samples: list[list[float]], t: float) -> float:
    """The bytes-sent counter of a trace at `t` seconds, linear between samples."""
    for (t0, a, _), (t1, b, _) in pairwise(samples):
        if t0 <= t <= t1:
            return a + (b - a) * (t - t0) / (t1 - t0) if t1 > t0 else b
    return samples[-1][1]


def print_trace(step: str, run: Run, rounds: list[list[dict]], bins: int = 80) -> None:
    """Each peer's link over the median round of `step` (--trace): send (^) and receive (v)
    rates as characters, the phases marked j (joined: the roster is known), m (shards moved)
    and c (the leader's decision), and the share of its uplink the shard transfer used."""
    times = [max(p["s"] for p in r) for r in rounds]
    r = rounds[sorted(range(len(rounds)), key=times.__getitem__)[len(rounds) // 2]]
    t_end = max(p["s"] for p in r)
    print(f"\n{step}: the link over the median round ({t_end:.2f} s, {t_end / bins * 1e3:.0f} ms a character; "
          f"'{LEVELS[-1]}' = the cap, j joined, m shards moved, c decided)")
    for i, p in enumerate(r):
        cap = (run.caps[i] or 0) * 1e6 / 8 or max(1.0, max(s[1] for s in p["trace"]) / t_end)
        marks = [" "] * bins
        for key, ch in (("joined", "j"), ("moved", "m"), ("committed", "c")):
            if key in p["marks"]:
                marks[min(bins - 1, int(p["marks"][key] / t_end * bins))] = ch
        used = ""
        m = p["marks"]
        if "joined" in m and "moved" in m and m["moved"] > m["joined"] and run.caps[i]:
            sent = sent_at(p["trace"], m["moved"]) - sent_at(p["trace"], m["joined"])
            share = sent / (cap * (m["moved"] - m["joined"]))
            used = f"  uplink used {100 * share:.0f} % while moving shards"
        print(f"  peer {i}    {''.join(marks)}{used}")
        print(f"  peer {i} ^  {rate_row(p['trace'], 1, t_end, bins, cap)}")
        print(f"  peer {i} v  {rate_row(p['trace'], 2, t_end, bins, cap)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, nargs="+", default=[2, 4], help="group sizes (8 is slow on 2 cores)")
    ap.add_argument("--mib", type=int, nargs="+", default=[16, 64], help="payload sizes, MiB of float32")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--codecs", nargs="+", default=default_codecs(),
                    help="our wire codecs (default: every one of peer.codecs.CODECS, and sparse)")
    ap.add_argument("--backends", nargs="+", default=["ours", "hivemind", "gloo"],
                    choices=["ours", "hivemind", "gloo"])
    ap.add_argument("--net", choices=["loopback", "netns"], default="loopback")
    ap.add_argument("--mbit", type=float, default=100.0, help="--net netns: every link's rate, both directions")
    ap.add_argument("--slow-peer", action="store_true", help="--net netns: also a run with one link at a quarter")
    ap.add_argument("--shard-sizing", nargs="+", default=["rate", "equal"], choices=["rate", "equal"],
                    help="--slow-peer: our run spec's --shard-sizing values in the quarter-rate run, a row each "
                         "(equal links always run rate)")
    ap.add_argument("--step-timeout", type=float, default=600.0, help="seconds one round of all peers may take")
    ap.add_argument("--log-dir", default="", help="where the workers' logs go (default: a temporary folder)")
    ap.add_argument("--trace", action="store_true",
                    help="print each peer's send and receive rate over our steps' median round (where a link idled)")
    args = ap.parse_args()
    if min(args.k) < 2 or min(args.mib) < 1 or args.rounds < 1:
        ap.error("need every --k >= 2, every --mib >= 1 and --rounds >= 1")
    for c in args.codecs:
        try:
            get_codec(c)
        except ValueError as e:
            ap.error(f"--codecs: {e}")
    if args.slow_peer and args.net != "netns":
        ap.error("--slow-peer needs --net netns (the quarter-rate link is a tc cap)")
    if args.net == "netns":
        from tests.links import LinksUnavailable, check_available
        try:
            check_available()
        except LinksUnavailable as e:
            sys.exit(f"--net netns: {e}; run as root with iproute2, or use --net loopback")
    import tempfile
    log_root = Path(args.log_dir or tempfile.mkdtemp(prefix="allreduce-"))
    where = f"namespaces, links capped at {args.mbit:g} Mbit/s" if args.net == "netns" else "loopback"
    print(f"all-reduce of float32 deltas, {args.rounds} rounds, {where}; {os.cpu_count()} cores shared with "
          f"other work: figures are noisy. Logs in {log_root}")
    for k in args.k:
        for mib in args.mib:
            numel = mib * 2**20 // 4
            caps: list[float | None] = [args.mbit] * k if args.net == "netns" else [None] * k
            variants = [("equal links", caps, ("rate",))]
            if args.slow_peer:
                variants.append((f"peer {k - 1} at {args.mbit / 4:g} Mbit/s", [*caps[:-1], args.mbit / 4],
                                 tuple(args.shard_sizing)))
            for name, c, sizings in variants:
                log_dir = log_root / f"k{k}-{mib}mib-{len(set(c))}"
                log_dir.mkdir(parents=True, exist_ok=True)
                print_run(swarm_run(k, numel, args, log_dir, c, sizings), f"k = {k}, {mib} MiB, {name}")


if __name__ == "__main__":
    main()
