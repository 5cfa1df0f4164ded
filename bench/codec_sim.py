"""A swarm of k peers simulated in one process, without sockets: each peer trains its own copy of
the built-in model (AdamW, the trainer's learning-rate schedule, its own data position), then the
round runs the real codecs with error feedback, the real owner reduction and re-encoding per shard
(peer.net.allreduce.encode_shard / OwnedShard._reduce_encode's steps) and the real outer step. No
network, no timing: the same numbers on every run, so a codec's or a setting's effect on training
is measured without the swarm's noise. Prints eval loss of the global state per round. Not a test.

    .venv/bin/python bench/codec_sim.py [--codecs fp32 sparse] [--rounds 8] [--steps 20] [--every 8]
        [--outer-lr L --outer-momentum M --ef-decay B] [--density 0.015625 --chunk 4096] [--seeds 0 1]
        [--jitter [--owner-moves hand]] [--owner-codec fp32] [--exact-values exact|mean|0.75]

Each codec runs with the CLI's defaults for it (sparse: SparseLoCo's outer step, config.SPARSE_DEFAULTS)
unless --outer-lr, --outer-momentum or --ef-decay say otherwise. The last options are experiments:
shard bounds that move every round as measured upload rates move them, and what an owner's residual
does then; owners sending the exact mean (no second top-k); the kept values sent exactly, or as two
magnitudes per chunk.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from peer.aggregate import weighted_mean  # noqa: E402
from peer.codecs import get_codec  # noqa: E402
from peer.config import SPARSE_DEFAULTS, RunSpec, wire_codec  # noqa: E402
from peer.feedback import ErrorFeedback  # noqa: E402
from peer.inner import optimizer_groups, train_step  # noqa: E402
from peer.net.shardmap import shard_plan  # noqa: E402
from peer.outer import assign_flat_, flatten_params, outer_step  # noqa: E402
from peer.tasks import TaskOptions, inner_lr, make_task  # noqa: E402


class SimPeer:
    """One peer's local side: its model copy, inner optimizer, data position and residuals."""

    def __init__(self, i: int, spec: RunSpec, seed: int, batch: int, eval_batches: int):
        opts = TaskOptions(model=spec.model, model_seed=spec.model_seed, batch_size=batch,
                           eval_batches=eval_batches, peer_key=f"{seed}/p{i}")
        self.task = make_task("", opts)
        self.model = self.task.build_model()
        self.params = self.task.parameters(self.model)
        self.stream = self.task.train_stream()
        self.opt = torch.optim.AdamW(optimizer_groups(self.params, spec.weight_decay), lr=spec.inner_lr,
                                     betas=(0.9, 0.95))
        self.scaler = torch.amp.GradScaler("cpu", enabled=False)
        self.ef, self.owner_ef = ErrorFeedback(), ErrorFeedback()

    def train(self, theta: torch.Tensor, steps: int, base_samples: int, peers: int, spec: RunSpec) -> tuple:
        assign_flat_(self.params, theta)
        samples = 0
        self.model.train()
        for _ in range(steps):
            lr = inner_lr(base_samples + samples * peers, spec.inner_lr, spec.warmup_samples, spec.total_samples)
            for group in self.opt.param_groups:
                group["lr"] = lr
            batch = self.stream.next_batch()
            samples += self.task.samples(batch)
            train_step(self.task, self.model, self.opt, self.scaler, [batch], torch.device("cpu"), torch.float32)
        return torch.sub(theta, flatten_params(self.params)), samples


class TopkExact:
    """Experiment only: the sparse codec's choice of values, sent exactly (no 2-bit quantization),
    or (`levels`) as sign and one of two magnitudes per chunk, the mean |x| of the kept values
    above and below a threshold (`levels` x the chunk's largest kept |x|, or 'mean': their mean)."""

    EXACT = False

    def __init__(self, name: str, levels: str = ""):
        self.inner = get_codec(name)
        self.levels = levels

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        c = self.inner
        out = torch.zeros_like(x)
        n = x.numel()
        for a in range(0, n, c.chunk):
            seg = x[a:a + c.chunk]
            k = min(c.k, seg.numel())
            idx = torch.topk(seg.abs(), k).indices
            v = seg[idx]
            if self.levels:
                m = v.abs()
                cut = m.mean() if self.levels == "mean" else m.max() * float(self.levels)
                big = m > cut
                hi = m[big].mean() if bool(big.any()) else m.max()
                lo = m[~big].mean() if bool((~big).any()) else hi
                v = torch.sign(v) * torch.where(big, hi, lo)
            out[a + idx] = v
        return out

    def decode(self, data: torch.Tensor, numel: int) -> torch.Tensor:
        return data


def average(peers: list[SimPeer], deltas: list[torch.Tensor], weights: list[float], codec_name: str,
            args: argparse.Namespace, r: int, rng: random.Random) -> torch.Tensor:
    """One round's average as every member decodes it: each member encodes every shard with its
    residual added, each shard's owner decodes the parts, takes the weighted mean, adds its own
    residual and encodes once; residuals are committed as Keeper.commit does (an owner's with
    update_owned: zero outside the ranges it owns this round). --jitter: shards sized by random
    upload rates (within 30 %), as measured rates move them in a swarm; --owner-moves hand: what an
    owner's residual holds outside its new range goes into its member residual, x total/own weight."""
    codec = TopkExact(codec_name, args.exact_values if args.exact_values != "exact" else "") \
        if args.exact_values else get_codec(codec_name)
    numel, names = deltas[0].numel(), [f"p{i}" for i in range(len(peers))]
    rates = [float(1 << 20) * (1 + 0.3 * rng.random()) for _ in peers] if args.jitter else [0.0] * len(peers)
    owners, bounds = shard_plan(numel, names, rates)
    if args.owner_moves == "hand" and not codec.EXACT:
        for j, owner in enumerate(peers):
            e = owner.owner_ef._residual
            if e is None:
                continue
            moved = e.clone()
            moved[bounds[j]:bounds[j + 1]] = 0
            e[:bounds[j]] = 0
            e[bounds[j + 1]:] = 0
            if owner.ef._residual is None:
                owner.ef._residual = torch.zeros(numel)
            owner.ef._residual.add_(moved.mul_(sum(weights) / weights[j]))
    avg = torch.empty(numel, dtype=torch.float32)
    for j in range(len(owners)):
        a, b = bounds[j], bounds[j + 1]
        parts = []
        for p, d in zip(peers, deltas, strict=True):
            if codec.EXACT:
                parts.append(d[a:b])
                continue
            target = p.ef.compensate(a, d[a:b], numel)
            decoded = codec.decode(codec.encode(target), b - a)
            p.ef.update(a, target, decoded, numel)
            parts.append(decoded)
        mean = weighted_mean(list(zip(weights, parts, strict=True)))
        owner = peers[j]
        if codec.EXACT or args.owner_codec == "fp32":
            avg[a:b] = mean
            continue
        target = owner.owner_ef.compensate(a, mean, numel)
        decoded = codec.decode(codec.encode(target), b - a)
        owner.owner_ef.update_owned(r, a, target, decoded, numel)
        avg[a:b] = decoded
    return avg


def evaluate(peer: SimPeer, theta: torch.Tensor, eval_set: list) -> float:
    assign_flat_(peer.params, theta)
    peer.model.eval()
    with torch.no_grad():
        losses = [float(peer.task.loss(peer.model, b)) for b in eval_set]
    return sum(losses) / len(losses)


def simulate(args: argparse.Namespace, seed: int, codec: str) -> list[tuple[int, float]]:
    """The eval loss of the global state after each round: [(global samples, loss)], round 0 first."""
    outer = {**(SPARSE_DEFAULTS if codec == "sparse" else {}),   # the CLI's defaults for the codec ...
             **{k: v for k in ("outer_lr", "outer_momentum", "ef_decay") if (v := getattr(args, k)) is not None}}
    spec = RunSpec(model=args.model, model_seed=seed, codec=codec, sparse_chunk=args.chunk,
                   sparse_density=args.density, warmup_samples=args.warmup_samples,
                   total_samples=args.total_samples or RunSpec.total_samples, **outer)   # ... and the flags given
    name = wire_codec(spec)
    peers = [SimPeer(i, spec, seed, args.batch_size, args.eval_windows // args.batch_size) for i in range(args.peers)]
    for p in peers:
        p.ef.decay = spec.ef_decay
    eval_set = peers[0].task.eval_batches()
    theta = flatten_params(peers[0].params).clone()
    momentum = torch.zeros_like(theta)
    samples, rng = 0, random.Random(seed)
    curve = [(0, evaluate(peers[0], theta, eval_set))]
    for _ in range(args.rounds):
        results = [p.train(theta, args.steps, samples, args.peers, spec) for p in peers]
        deltas = [d for d, _ in results]
        avg = average(peers, deltas, [float(args.steps)] * args.peers, name, args, len(curve) - 1, rng)
        theta, momentum = outer_step(theta, momentum, avg, spec.outer_lr, spec.outer_momentum)
        samples += sum(s for _, s in results)
        curve.append((samples, evaluate(peers[0], theta, eval_set)))
    return curve


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--codecs", nargs="+", default=["fp32", "sparse"])
    ap.add_argument("--peers", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20, help="inner steps per peer per round")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--eval-windows", type=int, default=128)
    ap.add_argument("--chunk", type=int, default=4096)
    ap.add_argument("--density", type=float, default=1 / 64)
    ap.add_argument("--ef-decay", type=float, help="the run spec's (1; 0.95 for sparse)")
    ap.add_argument("--jitter", action="store_true", help="shard bounds move every round (random upload rates)")
    ap.add_argument("--owner-moves", default="drop", choices=["drop", "hand"], help="an owner's residual outside "
                    "its new range: dropped (update_owned), or handed to its member residual")
    ap.add_argument("--owner-codec", default="same", choices=["same", "fp32"],
                    help="fp32: owners send the exact mean (no second sparsification)")
    ap.add_argument("--exact-values", default="", help="sparse: top-k values sent 'exact' (no 2 bits), or as "
                    "two magnitudes per chunk, the means above and below a cut: 'mean' or a share of the max")
    ap.add_argument("--outer-lr", type=float, help="the run spec's (0.7; 2 for sparse)")
    ap.add_argument("--outer-momentum", type=float, help="the run spec's (0.9; 0 for sparse)")
    ap.add_argument("--warmup-samples", type=int, default=20_000)
    ap.add_argument("--total-samples", type=int, default=0, help="the end of the cosine schedule (0: the spec's)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--every", type=int, default=0, help="print the curve every N rounds (0: the end only)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    finals = {}
    for codec in args.codecs:
        ends = []
        for seed in args.seeds:
            t = time.monotonic()
            curve = simulate(args, seed, codec)
            ends.append(curve[-1][1])
            if args.every:
                print(f"{codec} seed {seed}: " + " ".join(f"{loss:.3f}" for _, loss in curve[::args.every]))
            print(f"{codec} seed {seed}: eval {curve[-1][1]:.4f} at {curve[-1][0]} samples ({time.monotonic() - t:.0f} s)",
                  flush=True)
        finals[codec] = statistics.mean(ends)
    ref = finals.get("fp32")
    for codec, loss in finals.items():
        gap = f"{100 * (loss - ref) / ref:+.2f}%" if ref else ""
        print(f"{codec:10} {loss:.4f} {gap}")


if __name__ == "__main__":
    main()
