"""Chaos run: N peers of the `tiny` model (int8 codec) on 127.0.0.1; every 1-3 rounds a random peer gets a
random fault: SIGKILL (restarted 5-20 s later under a new name), SIGSTOP for 5-20 s (the peer process only),
or an extra peer that SIGKILLs itself at a network point (fault plan; one at a time, so the swarm is N+1
while it lives; SIGKILLed by us if it has not reached its point after 240 s). At least 3 peers stay up;
p0 is never faulted (it paces the faults and is the peer whose threads and fds are shown). Prints rounds,
faults survived, hangs, divergences, memory and kill-to-next-round times. Not a test.

With --netns (root): every process on its own host of a tests/links.py Topology (network namespaces,
tbf caps of --mbit each way, 100 Mbit/s by default), the `base` preset by default (--model), and one
more fault kind, `join`: a fresh peer with no state joins mid-run and leaves by itself after
NEWCOMER_ROUNDS rounds (one extra peer at a time, like the self-killing ones). Both modes also print
the state rounds with two digests, the solo rounds while 2 or more peers held the state, and each
newcomer's time from its start to its first contribution beside its download time.

    .venv/bin/python bench/chaos.py [--peers 5] [--faults 100] [--minutes 60] [--seed 0] [--root DIR]
    .venv/bin/python bench/chaos.py --netns [--model base] [--mbit 100] [--target-steps 10] [--hang-s 300]
                                    [--kinds kill stop net join]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from chaos_report import report  # noqa: E402

from tests import procs  # noqa: E402
from tests.links import LinksUnavailable, Topology  # noqa: E402

LOCAL = ["--dht-host-maddrs", "/ip4/127.0.0.1/tcp/0", "--host", "127.0.0.1", "--threads", "1"]
RUN = ["--codec", "int8", "--min-peers", "3", "--batch-size", "4", "--eval-batches", "1", "--join-window-s", "4",
       "--run-id", "chaos"]   # and --model, --target-steps: per mode, see main()
POINTS = ("after_join", "after_send", "serving_shard", "leader_commit")
MIN_ALIVE = 3
# with --hang-s 120 (loopback's default): an extra's deadline 240 s, at most 180 s between faults, 300 s to settle
EXTRA_DEADLINE, GAP, SETTLE = 2.0, 1.5, 2.5   # times --hang-s
NEWCOMER_ROUNDS, NEWCOMER_DEADLINE = 6, 6.0   # a `join` peer leaves after this many rounds; killed at 6 x --hang-s


class Peer:
    def __init__(self, name: str, proc: subprocess.Popen, slot: int | None, kind: str = ""):
        self.name, self.proc, self.slot = name, proc, slot   # slot None: an extra peer (kind net or join)
        self.kind, self.host = kind, None                     # host: its Topology host in --netns mode
        self.started = self.progress = time.time()
        self.stopped, self.hung, self.died, self.orphans_checked = False, False, None, False
        self.kids: dict[int, psutil.Process] = {}   # every descendant ever seen
        self.mem: list[tuple[float, int]] = []      # (time, RSS of the peer and its descendants)


class Chaos:
    def __init__(self, args):
        self.args, self.rng, self.t0 = args, random.Random(args.seed), time.time()
        self.root = Path(args.root or tempfile.mkdtemp(prefix="chaos-"))
        self.root.mkdir(parents=True, exist_ok=True)
        self.peers: dict[str, Peer] = {}
        self.cache: dict[str, tuple[int, list[dict]]] = {}   # metrics rows read so far: (offset, rows)
        self.gen: dict[int, int] = {}                         # restarts per slot
        self.timers: list[tuple[float, str, str]] = []       # (due, "restart" | "cont", peer name)
        self.res: list[tuple[float, int, int]] = []          # p0: (time, threads, open fds)
        self.faults, self.hangs, self.orphans = [], [], []
        self.last_sample, self.boot, self.t_end = 0.0, None, 0.0
        self.run_args = [*RUN, "--model", args.model, "--target-steps", str(args.target_steps)]
        self.topo = Topology("chaos") if args.netns else None
        self.hang_s = args.hang_s

    def host_for(self, slot: int | None):
        """--netns: a slot's peers run on the slot's host; an extra on a pool host nobody uses now."""
        if slot is not None:
            name = f"slot{slot}"
        else:
            busy = {p.host.name for p in self.live() if p.host is not None}
            name = next((h for h in self.topo.hosts if h.startswith("extra") and h not in busy),
                        f"extra{sum(h.startswith('extra') for h in self.topo.hosts)}")
        if name not in self.topo.hosts:
            self.topo.add_host(name, self.args.mbit, self.args.mbit)
        return self.topo.hosts[name]

    def start_peer(self, name: str, slot: int | None, env: dict | None = None, kind: str = "",
                   extra: tuple[str, ...] = ()) -> Peer:
        host = self.host_for(slot) if self.topo else None
        where = LOCAL if host is None else ["--dht-host-maddrs", host.maddr(), "--host", host.ip, "--threads", "1"]
        args = [*where, *self.run_args, "--initial-peers", self.addr, "--metrics-file", f"{self.root}/{name}.jsonl",
                *extra]
        argv, env = procs.python_module("peer.cli", *args), {"OMP_NUM_THREADS": "1", **(env or {})}
        log = self.root / f"{name}.log"
        proc = procs.start_proc(argv, env, log) if host is None else self.topo.start(host, argv, env, log)
        self.peers[name] = peer = Peer(name, proc, slot, kind)
        peer.host = host
        return peer

    def rows(self, name: str) -> list[dict]:
        """The peer's metrics rows so far, read incrementally (whole lines only)."""
        offset, rows = self.cache.setdefault(name, (0, []))
        path = self.root / f"{name}.jsonl"
        if path.exists():
            with open(path, "rb") as f:
                f.seek(offset)
                chunk = f.read()
            done = chunk.rfind(b"\n") + 1
            rows += [json.loads(line) for line in chunk[:done].splitlines() if line.strip()]
            self.cache[name] = (offset + done, rows)
        return rows

    def live(self) -> list[Peer]:
        return [p for p in self.peers.values() if p.proc.poll() is None]

    def active(self) -> list[Peer]:
        return [p for p in self.live() if p.slot is not None and not p.stopped]

    def applied_after(self, t: float) -> bool:
        return any(r["outcome"] == "applied" and r["time"] > t for n in self.peers for r in self.rows(n))

    def inject(self) -> bool:
        now, kind, secs = time.time(), self.rng.choice(self.args.kinds), self.rng.uniform(5, 20)
        cands = [p for p in self.active() if p.slot != 0]
        if kind in ("kill", "stop") and (len(self.active()) - 1 < MIN_ALIVE or not cands):
            kind = "net" if "net" in self.args.kinds else "join"
        if kind in ("net", "join") and any(p.slot is None for p in self.live()):
            return False
        if kind == "join":   # a fresh peer: no state, no checkpoint; it downloads the state and joins
            victim = self.start_peer(f"n{len(self.faults) + 1}", None, kind="join",
                                     extra=("--max-rounds", str(NEWCOMER_ROUNDS)))
            detail, effect = f"newcomer, leaves after {NEWCOMER_ROUNDS} rounds", now
        elif kind == "net":
            point = self.rng.choice(POINTS)
            victim = self.start_peer(f"x{len(self.faults) + 1}-{point}", None,
                                     {"DILOCO_FAULTS": json.dumps([{"point": point, "action": "kill"}])}, "net")
            detail, effect = point, None   # takes effect when it dies
        else:
            victim = self.rng.choice(cands)
            self.sample(victim)   # its descendants, before they are reparented
            os.kill(victim.proc.pid, signal.SIGKILL if kind == "kill" else signal.SIGSTOP)
            victim.stopped = kind == "stop"
            self.timers.append((now + secs, "restart" if kind == "kill" else "cont", victim.name))
            detail, effect = f"{'restart' if kind == 'kill' else 'SIGCONT'} in {secs:.0f} s", now
        self.faults.append({"kind": kind, "victim": victim.name, "t": now, "effect": effect,
                            "detail": detail})
        print(f"[{now - self.t0:5.0f} s] fault {len(self.faults)}: {kind} {victim.name} ({detail})",
              flush=True)
        return True

    def sample(self, p: Peer) -> None:
        try:
            me, kids = psutil.Process(p.proc.pid), procs.descendants(p.proc.pid)
            p.kids.update({k.pid: k for k in kids if k.pid not in p.kids})
            rss = me.memory_info().rss + sum(k.memory_info().rss for k in kids)
            if p.name == "p0":
                self.res.append((time.time(), me.num_threads(), me.num_fds()))
        except psutil.Error:
            return
        p.mem.append((time.time(), rss))

    def watch(self) -> None:
        now = time.time()
        for due in [t for t in self.timers if t[0] <= now]:
            self.timers.remove(due)
            peer = self.peers[due[2]]
            if due[1] == "restart":
                self.gen[peer.slot] = self.gen.get(peer.slot, 0) + 1
                self.start_peer(f"p{peer.slot}.{self.gen[peer.slot]}", peer.slot)
            elif peer.proc.poll() is None:
                os.kill(peer.proc.pid, signal.SIGCONT)
                peer.stopped, peer.progress = False, now
        if now - self.last_sample >= 2:
            self.last_sample = now
            for p in self.live():
                self.sample(p)
        for p in self.peers.values():
            if p.proc.poll() is not None:
                if p.died is None:
                    p.died = now
                    for f in self.faults:
                        f["effect"] = f["effect"] or (now if f["victim"] == p.name else None)
                if now - p.died > 15 and not p.orphans_checked:   # README: children die with their peer
                    p.orphans_checked = True
                    self.orphans += [f"orphan of {p.name}: {procs._describe(k)}" for k in p.kids.values()
                                     if not procs._is_gone(k)]
                continue
            if p.slot is None and now - p.started > self.hang_s * (NEWCOMER_DEADLINE if p.kind == "join"
                                                                   else EXTRA_DEADLINE):
                os.kill(p.proc.pid, signal.SIGKILL)
                next(f for f in self.faults if f["victim"] == p.name)["detail"] += (
                    " (SIGKILLed at the deadline)" if p.kind == "join" else " (never got there)")
                p.proc.wait(10)
                continue
            p.progress = max([p.progress] + [r["time"] for r in self.rows(p.name)[-1:]])
            if not p.stopped and now - p.progress > self.hang_s and not p.hung:   # one line per episode
                self.hangs.append(f"HANG {p.name}: no round for {self.hang_s:.0f} s at {now - self.t0:.0f} s")
                print(self.hangs[-1], flush=True)
            p.hung = not p.stopped and now - p.progress > self.hang_s

    def run(self) -> None:
        print(f"logs and metrics in {self.root}", flush=True)
        if self.topo is None:
            boot = procs.python_module("bootstrap", "--host-maddrs", "/ip4/127.0.0.1/tcp/0")
            self.boot = procs.start_proc(boot, None, self.root / "bootstrap.log")
        else:   # its own host, uncapped: it carries only DHT traffic
            host = self.topo.add_host("bootstrap")
            boot = procs.python_module("bootstrap", "--host-maddrs", host.maddr())
            self.boot = self.topo.start(host, boot, None, self.root / "bootstrap.log")
        self.addr = procs.wait_for_line(self.boot, r"^Join through: (\S+)", 60).group(1)
        for i in range(self.args.peers):
            self.start_peer(f"p{i}", i)
        end_at = self.t0 + 60 * self.args.minutes   # p0 is never faulted: its rounds pace the faults
        base, gap, gap_end = len(self.rows("p0")), self.rng.randint(1, 3), time.time() + GAP * self.hang_s
        while len(self.faults) < self.args.faults and time.time() < end_at:
            self.watch()
            if (len(self.rows("p0")) >= base + gap or time.time() > gap_end) and self.inject():
                base, gap, gap_end = len(self.rows("p0")), self.rng.randint(1, 3), time.time() + GAP * self.hang_s
            time.sleep(0.5)
        settle = time.time() + SETTLE * self.hang_s   # restarts, SIGCONTs due, extras dead, then an applied round
        while time.time() < settle:
            self.watch()   # first: an extra that just died sets its fault's effect time here
            last = max([f["effect"] or 0 for f in self.faults] + [0])
            if not (self.timers or any(p.slot is None for p in self.live()) or not self.applied_after(last)):
                break
            time.sleep(0.5)

    def shutdown(self) -> None:
        self.t_end = self.t_end or time.time()
        for p in self.live():
            self.sample(p)
            if p.stopped:
                os.kill(p.proc.pid, signal.SIGCONT)
        stopping = [(p.name, p.proc) for p in self.live()] + [("bootstrap", self.boot)] * bool(self.boot)
        kids = [(p.name, k) for p in self.peers.values() for k in p.kids.values()]
        kids += [("bootstrap", k) for k in procs.descendants(self.boot.pid)] if self.boot else []
        for _, proc in stopping:
            proc.send_signal(signal.SIGTERM)
        deadline = time.time() + 15
        for name, proc in stopping:
            try:
                code = proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                proc.kill()
                code = f"{proc.wait(10)}: SIGKILLed, still running 15 s after SIGTERM"
            if code != 0:
                print(f"stop: {name} exited {code}")
        deadline = time.time() + 10
        while any(not procs._is_gone(k) for _, k in kids) and time.time() < deadline:
            time.sleep(0.2)
        left = [(name, k) for name, k in kids if not procs._is_gone(k)]
        for name, k in left:
            print(f"ORPHAN after stop, of {name}: {procs._describe(k)}")
            k.kill()
        print(f"stopped everything; orphans after stop: {len(left)}")
        if self.topo is not None:
            self.topo.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag, kind, default in (("peers", int, 5), ("faults", int, 100), ("minutes", float, 60),
                                ("seed", int, 0), ("root", str, "")):   # root: default a new temp dir
        ap.add_argument(f"--{flag}", type=kind, default=default)
    ap.add_argument("--netns", action="store_true", help="each peer on its own rate-capped host (needs root)")
    ap.add_argument("--mbit", type=float, default=100.0, help="--netns: every peer's cap each way")
    ap.add_argument("--model", choices=("tiny", "small", "base"), help="preset (default: tiny; base with --netns)")
    ap.add_argument("--target-steps", type=int, help="run spec (default: 150 for tiny, 10 otherwise)")
    ap.add_argument("--hang-s", type=float, help="a live peer with no round for this long hangs; the extras' "
                    "deadline, the gap between faults and the settling time scale with it (default: 120; 300 "
                    "for base, whose rounds take a minute on 2 cores)")
    ap.add_argument("--kinds", nargs="+", choices=("kill", "stop", "net", "join"),
                    help="fault kinds to draw from (default: kill stop net; with --netns also join)")
    args = ap.parse_args()
    args.model = args.model or ("base" if args.netns else "tiny")
    args.target_steps = args.target_steps or (150 if args.model == "tiny" else 10)
    args.hang_s = args.hang_s or (300.0 if args.model == "base" else 120.0)
    args.kinds = args.kinds or (["kill", "stop", "net", "join"] if args.netns else ["kill", "stop", "net"])
    if args.peers <= MIN_ALIVE:
        ap.error(f"--peers must be more than {MIN_ALIVE}")
    try:
        chaos = Chaos(args)
    except LinksUnavailable as e:
        ap.error(f"--netns needs network namespaces: {e}")
    try:
        chaos.run()
    finally:
        chaos.shutdown()
    report(chaos)


if __name__ == "__main__":
    main()
