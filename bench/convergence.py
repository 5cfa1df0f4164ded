"""Eval loss against the swarm's samples and against wall time on the built-in task: one process
training alone with the swarm's total batch (the synchronous reference), a swarm of 4 peers with
each codec, fp32 with --overlap, and peers of mixed speed (two slowed by 20 ms per inner step)
under each --weighting. Real processes on 127.0.0.1 (bench/local_swarm.py). Writes a PNG (eval
loss by samples and by seconds, one curve per config) and prints a table. Not a test.

    .venv/bin/python bench/convergence.py [--model tiny] [--rounds 240] [--target-steps 20]
        [--codecs fp32 int8 int4 sparse] [--weightings steps samples equal] [--only NAME ...]
        [--repeats 1] [--out convergence.png]

The horizon: many short rounds (240 rounds of 20 inner steps, 5 per peer: 19200 samples). The
sparse codec sends 1/64 of each chunk a round, so its error feedback delivers a typical value
about 32 rounds late; it needs a run of a few hundred rounds to catch up with fp32, and it is
made for many short rounds (bench/codec_sim.py measures this without the swarm's noise).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from local_swarm import LocalSwarm  # noqa: E402

SLOW = json.dumps([{"point": "inner_step", "action": "sleep", "seconds": 0.02}])
START_EVAL = re.compile(r"eval loss at the start: ([0-9.]+)")


@dataclass
class Config:
    name: str
    peers: int = 4
    codec: str = "fp32"
    weighting: str = "steps"
    overlap: bool = False
    slow: int = 0                        # how many peers sleep 20 ms per inner step
    runs: list[Run] = field(default_factory=list)


@dataclass
class Run:
    curve: list[tuple[float, float, float]]   # (global samples, seconds, eval loss)
    rounds: int
    wall_s: float


def slug(name: str) -> str:
    return re.sub(r"\W+", "-", name)


def configs(codecs: list[str], weightings: list[str], peers: int, only: list[str]) -> list[Config]:
    """Every config, or (`only`) those named by one of its entries, or having it among the words of their name."""
    out = [Config("sync reference", peers=1)]
    out += [Config(f"{peers} peers {c}", peers=peers, codec=c) for c in codecs]
    out.append(Config(f"{peers} peers fp32 overlap", peers=peers, overlap=True))
    out += [Config(f"mixed speed {w}", peers=peers, weighting=w, slow=2) for w in weightings]
    return [c for c in out if not only or any(word == c.name or word in c.name.split() for word in only)]


def run(root: Path, cfg: Config, args: argparse.Namespace, seed: int) -> Run:
    """One run of `cfg`: the curve of peer p0's metrics (the global state, and so its eval
    loss, is the same bytes on every peer), the start from p0's log."""
    swarm_peers = args.peers
    solo = cfg.peers == 1
    # the reference trains the swarm's total batch in one process, so each round covers the same samples
    batch = args.batch_size * (swarm_peers if solo else 1)
    target = max(1, args.target_steps // swarm_peers) if solo else args.target_steps
    spec = ["--model", args.model, "--codec", cfg.codec, "--weighting", cfg.weighting,
            "--target-steps", str(target), "--min-peers", str(cfg.peers), "--max-rounds", str(args.rounds),
            "--batch-size", str(batch), "--eval-batches", str(args.eval_windows // batch),
            "--join-window-s", "3", "--model-seed", str(seed), "--run-id", slug(cfg.name)]
    if cfg.overlap:
        spec.append("--overlap")
    with LocalSwarm(root) as swarm:
        # a fixed key per peer index, so every config's peer i reads the same data (its id picks where)
        procs = [swarm.peer(f"p{i}", [*spec, "--seed", str(seed * 100 + i), "--identity-file",
                                      str(args.keys / f"p{i}.key")],
                            {"DILOCO_FAULTS": SLOW} if i >= cfg.peers - cfg.slow else {}) for i in range(cfg.peers)]
        deadline = time.monotonic() + args.timeout_s
        for i, p in enumerate(procs):
            try:
                rc = p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"{cfg.name}: peer p{i} still running after --timeout-s {args.timeout_s:g}; "
                                   f"see {root / f'p{i}.log'}") from None
            if rc != 0:
                raise RuntimeError(f"{cfg.name}: peer p{i} exited with {rc}; see {root / f'p{i}.log'}")
        rows = swarm.metrics("p0")
        m = START_EVAL.search((root / "p0.log").read_text())
    if not rows:
        raise RuntimeError(f"{cfg.name}: peer p0 wrote no metrics rows; see {root / 'p0.log'}")
    t0 = rows[0]["time"] - rows[0]["round_seconds"]   # the start of round 0's training
    curve = [(0.0, 0.0, float(m.group(1)))] if m else []
    curve += [(float(r["global_samples"]), r["time"] - t0, float(r["eval_loss"])) for r in rows
              if isinstance(r["eval_loss"], (int, float)) and math.isfinite(r["eval_loss"])]
    return Run(curve, sum(r["outcome"] == "applied" for r in rows), rows[-1]["time"] - t0)


def at_samples(curve: list[tuple[float, float, float]], samples: float) -> float:
    """The eval loss interpolated linearly at `samples` global samples."""
    for (s0, _, l0), (s1, _, l1) in zip(curve, curve[1:], strict=False):
        if s0 <= samples <= s1:
            return l0 if s1 == s0 else l0 + (l1 - l0) * (samples - s0) / (s1 - s0)
    return curve[-1][2] if samples >= curve[-1][0] else curve[0][2]


def plot(cfgs: list[Config], out: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_samples, by_time) = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for c in cfgs:   # the first repeat's curves
        style, curve = "--" if c.peers == 1 else "-", c.runs[0].curve
        by_samples.plot([s for s, _, _ in curve], [x for _, _, x in curve], style, marker=".", label=c.name)
        by_time.plot([t for _, t, _ in curve], [x for _, _, x in curve], style, marker=".", label=c.name)
    by_samples.set(xlabel="samples trained by the swarm", ylabel="eval loss", title=f"eval loss by samples ({title})")
    by_time.set(xlabel="seconds since round 0 started", title="eval loss by time")
    for ax in (by_samples, by_time):
        ax.grid(alpha=0.3)
    by_time.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny", choices=["tiny", "small"])
    ap.add_argument("--rounds", type=int, default=240)
    ap.add_argument("--target-steps", type=int, default=20, help="inner steps summed over the swarm per round")
    ap.add_argument("--peers", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=4, help="a swarm peer's batch (the reference's is peers x this)")
    ap.add_argument("--eval-windows", type=int, default=128, help="held-out windows every eval reads (a multiple "
                    "of peers x batch size, so the reference evaluates the same windows)")
    ap.add_argument("--codecs", nargs="+", default=["fp32", "int8", "int4", "sparse"])
    ap.add_argument("--weightings", nargs="+", default=["steps", "samples", "equal"])
    ap.add_argument("--repeats", type=int, default=1, help="runs of every config (model and data seeds differ); "
                    "the table gives the mean and the spread")
    ap.add_argument("--first-seed", type=int, default=0, help="repeat i runs seed first-seed + i (to add seeds "
                    "to a table from another invocation)")
    ap.add_argument("--out", default="convergence.png", help="the PNG to write")
    ap.add_argument("--only", nargs="+", default=[], help="run only the configs named by one of these, or with "
                    "one of these among the words of their name (e.g. '4 peers fp32' sparse int4 reference mixed); "
                    "the gap column needs '4 peers fp32' among them")
    ap.add_argument("--timeout-s", type=float, default=3600.0, help="the most one config's run may take")
    ap.add_argument("--log-dir", default="", help="keep each run's logs and metrics here (default: a temp folder)")
    ap.add_argument("--keys", default="", help="the peers' key files (made when missing; default: in the log "
                    "folder); every config and invocation that shares them reads the same data")
    args = ap.parse_args()
    if args.rounds < 1 or args.repeats < 1 or args.peers < 2 or args.target_steps < args.peers or args.batch_size < 1:
        ap.error("need --rounds >= 1, --repeats >= 1, --peers >= 2, --target-steps >= --peers and --batch-size >= 1")
    if args.eval_windows % (args.peers * args.batch_size):
        ap.error(f"--eval-windows {args.eval_windows} is not a multiple of peers x batch size "
                 f"({args.peers * args.batch_size}); the reference would evaluate other windows")
    if "fp32" not in args.codecs:
        args.codecs.insert(0, "fp32")     # the gap column is against fp32
    cfgs = configs(args.codecs, args.weightings, args.peers, args.only)
    if not cfgs:
        names = [c.name for c in configs(args.codecs, args.weightings, args.peers, [])]
        ap.error(f"--only {' '.join(map(repr, args.only))} names no config; the configs: {', '.join(names)}")
    log_root = Path(args.log_dir or tempfile.mkdtemp(prefix="convergence-"))
    args.keys = Path(args.keys) if args.keys else log_root / "keys"
    args.keys.mkdir(parents=True, exist_ok=True)
    print(f"model {args.model}, {args.rounds} rounds of {args.target_steps} inner steps x batch {args.batch_size} "
          f"({args.target_steps * args.batch_size} samples a round), loopback, 2-core machine shared with others: "
          f"wall times are noisy. Logs in {log_root}", flush=True)
    for rep in range(args.repeats):
        for c in cfgs:
            root = log_root / f"{slug(c.name)}-{args.first_seed + rep}"
            root.mkdir(parents=True, exist_ok=True)
            t = time.monotonic()
            c.runs.append(run(root, c, args, seed=args.first_seed + rep))
            print(f"  {c.name} seed {args.first_seed + rep}: {c.runs[-1].rounds} rounds, eval {c.runs[-1].curve[-1][2]:.4f} "
                  f"({time.monotonic() - t:.0f} s)", flush=True)
    plot(cfgs, args.out, args.model)
    equal = min(r.curve[-1][0] for c in cfgs for r in c.runs)
    losses = {c.name: [at_samples(r.curve, equal) for r in c.runs] for c in cfgs}
    fp32 = losses.get(f"{args.peers} peers fp32")
    ref = statistics.mean(fp32) if fp32 else math.nan
    print(f"\neval loss at {equal:.0f} global samples (each curve interpolated there), mean of {args.repeats} "
          f"run(s) (min-max); wrote {args.out}")
    print(f"{'config':26} {'eval loss':>9} {'min-max':>15} {'wall s':>7} {'rounds':>6} {'gap to fp32':>11}")
    for c in cfgs:
        loss, wall = statistics.mean(losses[c.name]), statistics.mean(r.wall_s for r in c.runs)
        print(f"{c.name:26} {loss:9.4f} {min(losses[c.name]):7.4f}-{max(losses[c.name]):7.4f} {wall:7.1f} "
              f"{sum(r.rounds for r in c.runs) / len(c.runs):6.1f} "
              + (f"{100 * (loss - ref) / ref:+10.2f}%" if fp32 else f"{'-':>11}"))   # fp32 not run (--only)


if __name__ == "__main__":
    main()
