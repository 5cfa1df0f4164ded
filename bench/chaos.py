"""Chaos run: N peers of the `tiny` model (int8 codec) on 127.0.0.1; every 1-3 rounds a random peer gets a
random fault: SIGKILL (restarted 5-20 s later under a new name), SIGSTOP for 5-20 s (the peer process only),
or an extra peer that SIGKILLs itself at a network point (fault plan; one at a time, so the swarm is N+1
while it lives; SIGKILLed by us if it has not reached its point after 240 s). At least 3 peers stay up;
p0 is never faulted (it paces the faults and is the peer whose threads and fds are shown). Prints rounds,
faults survived, hangs, divergences, memory and kill-to-next-round times. Not a test.

    .venv/bin/python bench/chaos.py [--peers 5] [--faults 100] [--minutes 60] [--seed 0] [--root DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests import procs  # noqa: E402

LOCAL = ["--dht-host-maddrs", "/ip4/127.0.0.1/tcp/0", "--host", "127.0.0.1", "--threads", "1"]
RUN = ["--model", "tiny", "--codec", "int8", "--target-steps", "150", "--min-peers", "3", "--batch-size", "4",
       "--eval-batches", "1", "--join-window-s", "4", "--run-id", "chaos"]
POINTS = ("after_join", "after_send", "serving_shard", "leader_commit")
MIN_ALIVE, HANG_S, EXTRA_DEADLINE_S, GAP_S, SETTLE_S = 3, 120, 240, 180, 300   # GAP_S: most s between faults


class Peer:
    def __init__(self, name: str, proc: subprocess.Popen, slot: int | None):
        self.name, self.proc, self.slot = name, proc, slot   # slot None: a self-killing extra peer
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

    def start_peer(self, name: str, slot: int | None, env: dict | None = None) -> Peer:
        args = [*LOCAL, *RUN, "--initial-peers", self.addr, "--metrics-file", f"{self.root}/{name}.jsonl"]
        proc = procs.start_proc(procs.python_module("peer.cli", *args),
                                {"OMP_NUM_THREADS": "1", **(env or {})}, self.root / f"{name}.log")
        self.peers[name] = peer = Peer(name, proc, slot)
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
        now, kind, secs = time.time(), self.rng.choice(["kill", "stop", "net"]), self.rng.uniform(5, 20)
        cands = [p for p in self.active() if p.slot != 0]
        if kind != "net" and (len(self.active()) - 1 < MIN_ALIVE or not cands):
            kind = "net"
        if kind == "net" and any(p.slot is None for p in self.live()):
            return False
        if kind == "net":
            point = self.rng.choice(POINTS)
            victim = self.start_peer(f"x{len(self.faults) + 1}-{point}", None,
                                     {"DILOCO_FAULTS": json.dumps([{"point": point, "action": "kill"}])})
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
            if p.slot is None and now - p.started > EXTRA_DEADLINE_S:
                os.kill(p.proc.pid, signal.SIGKILL)
                next(f for f in self.faults if f["victim"] == p.name)["detail"] += " (never got there)"
                p.proc.wait(10)
                continue
            p.progress = max([p.progress] + [r["time"] for r in self.rows(p.name)[-1:]])
            if not p.stopped and now - p.progress > HANG_S and not p.hung:   # one line per episode
                self.hangs.append(f"HANG {p.name}: no round for {HANG_S} s at {now - self.t0:.0f} s")
                print(self.hangs[-1], flush=True)
            p.hung = not p.stopped and now - p.progress > HANG_S

    def run(self) -> None:
        print(f"logs and metrics in {self.root}", flush=True)
        boot = procs.python_module("bootstrap", "--host-maddrs", "/ip4/127.0.0.1/tcp/0")
        self.boot = procs.start_proc(boot, None, self.root / "bootstrap.log")
        self.addr = procs.wait_for_line(self.boot, r"^Join through: (\S+)", 60).group(1)
        for i in range(self.args.peers):
            self.start_peer(f"p{i}", i)
        end_at = self.t0 + 60 * self.args.minutes   # p0 is never faulted: its rounds pace the faults
        base, gap, gap_end = len(self.rows("p0")), self.rng.randint(1, 3), time.time() + GAP_S
        while len(self.faults) < self.args.faults and time.time() < end_at:
            self.watch()
            if (len(self.rows("p0")) >= base + gap or time.time() > gap_end) and self.inject():
                base, gap, gap_end = len(self.rows("p0")), self.rng.randint(1, 3), time.time() + GAP_S
            time.sleep(0.5)
        settle = time.time() + SETTLE_S   # restarts and SIGCONTs due, extras dead, then an applied round
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


def fmt(xs: list[float]) -> str:
    return f"{statistics.median(xs):.1f} s / {max(xs):.1f} s (n={len(xs)})" if xs else "n/a"


def report(c: Chaos) -> None:
    rows = {name: c.rows(name) for name in c.peers}
    killed = {f["victim"] for f in c.faults if f["kind"] == "kill"}
    longest = [n for n, p in c.peers.items() if p.slot is not None and "." not in n and n not in killed]
    clean = [n for n in longest if n not in {f["victim"] for f in c.faults}]   # never faulted
    seen, by_round = {}, {}
    for name, rs in rows.items():
        for r in rs:
            by_round.setdefault(r["round"], []).append((name, r))
            if name in longest:
                seen.setdefault(r["round"], set()).add(r["outcome"])
    split = [n for n, rs in by_round.items() if {"applied", "aborted"} <= {r["outcome"] for _, r in rs}]
    solo = [f"round {r['round']}: {name} applied in a group of 1" for name, rs in rows.items() for r in rs
            if r["outcome"] == "applied" and r["group_size"] == 1]   # there were always >= 3 peers up
    diverged = [n for n, rs in by_round.items()
                if len({r["digest"] for _, r in rs if r["outcome"] == "applied"}) > 1]
    kinds = {k: [f for f in c.faults if f["kind"] == k] for k in ("kill", "stop", "net")}
    survived = [sum(1 for f in fs if f["effect"] and c.applied_after(f["effect"])) for fs in kinds.values()]
    to_next, to_applied = [], []
    for f in kinds["kill"]:
        after = [rs for rs in ([r for r in rows[n] if r["time"] > f["t"]] for n in clean) if rs]
        if after:
            to_next.append(max(rs[0]["time"] for rs in after) - f["t"])
            ends = [next((r["time"] for r in rs if r["outcome"] == "applied"), None) for rs in after]
            to_applied += [max(ends) - f["t"]] if all(ends) else []
    tracebacks = sum((c.root / f"{n}.log").read_text(errors="replace").count("Traceback") for n in c.peers)
    applied = sum("applied" in s for s in seen.values())
    aborted = sum("aborted" in s and "applied" not in s for s in seen.values())
    table = [
        ("longest-living peers (never killed)", ", ".join(longest) or "none"),
        ("rounds applied / aborted / only excluded, as they saw them",
         f"{applied} / {aborted} / {sum(s == {'excluded'} for s in seen.values())}"),
        ("faults injected: all (kill, stop, net)", f"{len(c.faults)} {tuple(map(len, kinds.values()))}"),
        ("faults survived: all (kill, stop, net)", f"{sum(survived)} {tuple(survived)}"),
        ("hangs: no round for 120 s, live and not stopped", len(c.hangs)),
        ("rounds with two applied digests (must be 0)", len(diverged)),
        ("rounds both applied and aborted (must be 0)", len(split)),
        ("rounds applied by a group of 1 (swarm always >= 3 up)", len(solo)),
        ("sum of the peers' own divergence counters", sum(r[-1]["divergences"] for r in rows.values() if r)),
        ("SIGKILL -> next round ends on survivors: median / max", fmt(to_next)),
        ("SIGKILL -> next applied round: median / max", fmt(to_applied)),
        ("orphans 15 s after a peer died", len(c.orphans)),
        ("tracebacks in peer logs", tracebacks),
    ]
    print(f"\nchaos: {c.args.peers} peers, {(c.t_end - c.t0) / 60:.1f} min, seed {c.args.seed}, "
          f"logs in {c.root}")
    for key, value in table:
        print(f"  {key:<56} {value}")
    print("  peak RSS with children, MB: slot, first minute of its first process, last minute of its last")
    for slot in range(c.args.peers):
        ps = [p for p in c.peers.values() if p.slot == slot]
        first = [m for t, m in ps[0].mem if t - ps[0].started <= 60]
        last = [m for t, m in ps[-1].mem if t >= c.t_end - 60]
        print(f"    p{slot}  {max(first, default=0) / 2**20:6.0f}  {max(last, default=0) / 2**20:6.0f}")
    for label, xs in (("first", [x for x in c.res if x[0] - c.t0 <= 60]),
                      ("last", [x for x in c.res if x[0] >= c.t_end - 60])):
        if xs:
            print(f"  p0, {label} minute: threads {max(x[1] for x in xs)}, open fds {max(x[2] for x in xs)}")
    for n in sorted(set(diverged) | set(split)):
        print(f"  ! round {n}: " + "; ".join(f"{name} {r['outcome']}, {r['group_size']} peers, "
                                             f"{r['digest'][:12]}" for name, r in by_round[n]))
    for line in solo + c.hangs + c.orphans:
        print("  ! " + line)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag, kind, default in (("peers", int, 5), ("faults", int, 100), ("minutes", float, 60),
                                ("seed", int, 0), ("root", str, "")):   # root: default a new temp dir
        ap.add_argument(f"--{flag}", type=kind, default=default)
    args = ap.parse_args()
    if args.peers <= MIN_ALIVE:
        ap.error(f"--peers must be more than {MIN_ALIVE}")
    chaos = Chaos(args)
    try:
        chaos.run()
    finally:
        chaos.shutdown()
    report(chaos)


if __name__ == "__main__":
    main()
