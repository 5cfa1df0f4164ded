"""`peer plot METRICS.jsonl... -o loss.png`: the eval loss of every peer in the files, against the
swarm's samples and against time, one line per peer (matplotlib, no display needed)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

from peer.config import EXIT_CONFIG, EXIT_OK


def read_curves(paths: list[str]) -> dict[str, list[tuple[float, float, float]]]:
    """peer id -> [(global samples, unix time, eval loss)] in file order; ValueError naming the
    file and line of anything that is not a metrics row."""
    curves: dict[str, list[tuple[float, float, float]]] = defaultdict(list)
    for path in paths:
        try:
            lines = Path(path).read_text().splitlines()
        except OSError as e:
            raise ValueError(f"{path}: cannot read it ({e.strerror})") from None
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                point = (float(row["global_samples"]), float(row["time"]), row["eval_loss"], str(row["peer_id"]))
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path} line {n}: not a metrics row of `peer --metrics-file` ({e})") from None
            if isinstance(point[2], (int, float)) and math.isfinite(point[2]):
                curves[point[3]].append((point[0], point[1], float(point[2])))
    if not curves:
        raise ValueError(f"no eval loss in {', '.join(paths)}: run the peers with --eval-batches > 0")
    return dict(curves)


def plot(paths: list[str], out: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = read_curves(paths)
    t0 = min(t for points in curves.values() for _, t, _ in points)
    fig, (by_samples, by_time) = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for peer, points in sorted(curves.items()):
        label = peer[-6:]
        by_samples.plot([s for s, _, _ in points], [loss for _, _, loss in points], marker=".", label=label)
        by_time.plot([(t - t0) / 60 for _, t, _ in points], [loss for _, _, loss in points], marker=".", label=label)
    by_samples.set(xlabel="samples trained by the swarm", ylabel="eval loss", title="eval loss by samples")
    by_time.set(xlabel="minutes since the first round", title="eval loss by time")
    for ax in (by_samples, by_time):
        ax.grid(alpha=0.3)
    by_time.legend(title="peer", fontsize="small")
    fig.tight_layout()
    try:
        fig.savefig(out, dpi=100)
    except OSError as e:
        raise ValueError(f"-o {out}: cannot write it ({e.strerror})") from None
    finally:
        plt.close(fig)
    rounds = sum(len(p) for p in curves.values())
    return f"wrote {out}: {len(curves)} peer(s), {rounds} rounds with an eval loss"


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="peer plot", description=__doc__.split("\n\n")[0])
    p.add_argument("metrics", nargs="+", help="files written by peer --metrics-file")
    p.add_argument("-o", "--out", default="loss.png", help="the PNG to write (default loss.png)")
    args = p.parse_args(argv)
    try:
        print(plot(args.metrics, args.out), flush=True)
    except ValueError as e:
        print(f"peer plot: error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    return EXIT_OK
