"""The report of a chaos run (bench/chaos.py): from the peers' round rows and logs and the run's
fault list, the rounds applied and aborted, the faults survived, hangs, divergences, solo rounds,
newcomers' time to a first contribution, memory and kill-to-next-round times."""

from __future__ import annotations

import re
import statistics
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from chaos import Chaos

DOWNLOADED = re.compile(r"downloaded the state of round (\d+): ([\d.]+) MB in ([\d.]+) s")


def fmt(xs: list[float]) -> str:
    return f"{statistics.median(xs):.1f} s / {max(xs):.1f} s (n={len(xs)})" if xs else "n/a"


def held(c: Chaos, rows: dict[str, list[dict]]) -> dict[str, tuple[float, float]]:
    """When each peer held the run's state: from the start of its first round (it had the state
    then) until it died or the run ended."""
    return {n: (rs[0]["time"] - rs[0]["round_seconds"], c.peers[n].died or c.t_end)
            for n, rs in rows.items() if rs}


def newcomer_lines(c: Chaos, rows: dict[str, list[dict]]) -> tuple[list[str], list[float]]:
    """Per `join` peer: start -> first contribution, beside its state download (from its log)."""
    lines, waits = [], []
    for name, p in c.peers.items():
        if p.kind != "join":
            continue
        log = (c.root / f"{name}.log").read_text(errors="replace")
        got = DOWNLOADED.search(log)
        download = (f"state of round {got.group(1)}: {got.group(2)} MB in {got.group(3)} s" if got
                    else "no state downloaded")
        mine = [r for r in rows[name] if r["outcome"] == "applied" and r["peer_id"] in r["contributors"]]
        if mine:
            waits.append(mine[0]["time"] - p.started)
            first = f"first contribution {waits[-1]:.1f} s after its start (round {mine[0]['round']})"
        else:
            lived = (p.died or c.t_end) - p.started
            first = (f"never contributed (lived {lived:.0f} s; rounds: "
                     + (", ".join(f"{r['round']} {r['outcome']}" for r in rows[name]) or "none") + ")")
        lines.append(f"{name} at {p.started - c.t0:.0f} s: {first}; {download}")
    return lines, waits


def report(c: Chaos) -> None:
    rows = {name: c.rows(name) for name in c.peers}
    states: dict[int, set[str]] = {}
    for rs in rows.values():
        for r in rs:
            states.setdefault(r["state_round"], set()).add(r["digest"])
    two_digests = sorted(n for n, ds in states.items() if len(ds) > 1)
    spans = held(c, rows)
    lonely = []   # solo rounds while 2 or more peers held the state (the solo peer counts)
    for name, rs in rows.items():
        for r in rs:
            if r["outcome"] == "applied" and r["group_size"] == 1:
                at = r["time"] - r["round_seconds"]
                holders = [n for n, (t0, t1) in spans.items() if t0 <= at <= t1]
                if len(holders) >= 2:
                    lonely.append(f"round {r['round']}: {name} applied alone while {len(holders)} peers held "
                                  f"the state ({', '.join(sorted(holders))})")
    joined, waits = newcomer_lines(c, rows)
    killed = {f["victim"] for f in c.faults if f["kind"] == "kill"}
    longest = [n for n, p in c.peers.items() if p.slot is not None and "." not in n and n not in killed]
    clean = [n for n in longest if n not in {f["victim"] for f in c.faults}]   # never faulted
    seen, by_round = {}, {}
    for name, rs in rows.items():
        for r in rs:
            by_round.setdefault(r["round"], []).append((name, r))
            if name in longest:
                seen.setdefault(r["round"], set()).add(r["outcome"])
    # an abort that advanced the state (every member heard it) beside an apply; an abort without a
    # decision keeps the round (state_round == round), and the retried round may then apply
    split = [n for n, rs in by_round.items()
             if "applied" in {r["outcome"] for _, r in rs}
             and any(r["outcome"] == "aborted" and r["state_round"] > r["round"] for _, r in rs)]
    solo = [f"round {r['round']}: {name} applied in a group of 1" for name, rs in rows.items() for r in rs
            if r["outcome"] == "applied" and r["group_size"] == 1]   # there were always >= 3 peers up
    diverged = [n for n, rs in by_round.items()
                if len({r["digest"] for _, r in rs if r["outcome"] == "applied"}) > 1]
    kinds = {k: [f for f in c.faults if f["kind"] == k] for k in ("kill", "stop", "net", *c.args.kinds)}
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
        (f"faults injected: all ({', '.join(kinds)})", f"{len(c.faults)} {tuple(map(len, kinds.values()))}"),
        (f"faults survived: all ({', '.join(kinds)})", f"{sum(survived)} {tuple(survived)}"),
        (f"hangs: no round for {c.hang_s:.0f} s, live and not stopped", len(c.hangs)),
        ("rounds with two applied digests (must be 0)", len(diverged)),
        ("rounds both applied and aborted by agreement (must be 0)", len(split)),
        ("rounds applied by a group of 1 (swarm always >= 3 up)", len(solo)),
        ("state rounds with two digests, any peer (must be 0)", len(two_digests)),
        ("solo rounds while 2 or more peers held the state", len(lonely)),
        ("newcomers that contributed / joined", f"{len(waits)} / {len(joined)}"),
        ("newcomer start -> first contribution: median / max", fmt(waits)),
        ("sum of the peers' own divergence counters", sum(r[-1]["divergences"] for r in rows.values() if r)),
        ("SIGKILL -> next round ends on survivors: median / max", fmt(to_next)),
        ("SIGKILL -> next applied round: median / max", fmt(to_applied)),
        ("orphans 15 s after a peer died", len(c.orphans)),
        ("tracebacks in peer logs", tracebacks),
    ]
    where = f"netns, {c.args.mbit} Mbit/s each way" if c.args.netns else "127.0.0.1"
    print(f"\nchaos: {c.args.peers} peers of {c.args.model} ({where}), {(c.t_end - c.t0) / 60:.1f} min, "
          f"seed {c.args.seed}, logs in {c.root}")
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
    for n in two_digests:
        print(f"  ! state round {n} has {len(states[n])} digests: "
              + ", ".join(d[:12] for d in sorted(states[n])))
    for line in solo + lonely + c.hangs + c.orphans:
        print("  ! " + line)
    if joined:
        print("  newcomers: start -> first contribution; state download")
    for line in joined:
        print("    " + line)
