"""The host work one peer does per round outside training and the wire, part by part, as a
multiple of one plain copy of the state, timed in the same run two ways: `theta.clone()` (new
memory: for a state this size the allocator may hand out fresh pages, whose first touch costs
more than the copy, or reuse freed ones, so this unit moves up to 3 x with what ran before) and
`held.copy_(theta)` into memory already touched (one pass at memory speed: the stricter, steady
unit). Every part's own new tensors pay the same first-touch cost as the clone. Calls the
functions a peer calls, in its order, on a state of --numel values (the `base` preset's
size by default): the model's parameters to the host buffer, the pseudo-gradient, encoding
this member's shards (with its error-feedback residual), decoding the k contributions to the
shard it owns and reducing and re-encoding it, decoding the k reduced shards into the
average, the outer step, the digest, the update-log entry with the residuals it settles,
the snapshot served to downloads, and the new state into the model. Prints a table; not a test.

    .venv/bin/python bench/round_overhead.py [--numel 14393088] [--members 4] [--codec fp32]
                                             [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from peer.hostmem import empty_f32, use_huge_pages  # noqa: E402

HUGE_PAGES = use_huge_pages(os.environ.get("DILOCO_HUGE_PAGES", "on"))   # as a peer does (--huge-pages)
import torch  # noqa: E402

from peer._proto import peer_pb2 as pb  # noqa: E402
from peer.codecs import get_codec  # noqa: E402
from peer.feedback import ErrorFeedback  # noqa: E402
from peer.net import allreduce as ar  # noqa: E402
from peer.net.replay import UpdateLog  # noqa: E402
from peer.net.round import make_roster  # noqa: E402
from peer.net.state_sync import StateSnapshot  # noqa: E402
from peer.outer import GlobalState, assign_flat_, flatten_params, outer_step, pseudo_gradient  # noqa: E402

BASE_NUMEL = 14_393_088   # the `base` GPT preset
LR, MOMENTUM = 0.7, 0.9


def clone_seconds(theta: torch.Tensor, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        copy = theta.clone()
        times.append(time.perf_counter() - t)
        del copy
    return statistics.median(times)


def held_copy_seconds(theta: torch.Tensor, held: torch.Tensor, repeats: int = 5) -> float:
    """One copy of theta into `held` (theta's size, touched before): a pass at memory speed."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        held.copy_(theta)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def model_params(numel: int, parts: int = 24) -> list[torch.Tensor]:
    """Parameters of uneven sizes summing to numel, like a model's list."""
    bounds = [numel * i // parts for i in range(parts + 1)]
    return [torch.zeros(bounds[i + 1] - bounds[i]) for i in range(parts)]


async def one_round(state: GlobalState, params: list[torch.Tensor], host: torch.Tensor, roster: pb.Roster,
                    codec, ef: ErrorFeedback, owner_ef: ErrorFeedback, others: list[bytes], log: UpdateLog,
                    gen: torch.Generator, scratch: torch.Tensor) -> tuple[GlobalState, dict[str, float]]:
    """One round's host work; returns the new state and seconds per part."""
    k, n = len(roster.members), len(roster.owners)
    b = roster.shard_bounds
    mine = [j for j in range(n) if roster.owners[j] == roster.owners[0]]   # this peer's pieces (round.pieces)
    with torch.no_grad():   # training moved the model: a small step away from the state
        for p in params:
            p.add_(torch.randn(p.shape, generator=gen), alpha=1e-3)
    parts: dict[str, float] = {}

    def timed(name, fn, *args):
        t = time.perf_counter()
        out = fn(*args)
        parts[name] = parts.get(name, 0.0) + time.perf_counter() - t
        return out

    local = timed("model -> host buffer", flatten_params, params, host)
    delta = timed("pseudo-gradient", pseudo_gradient, state.theta, local)
    encoded = timed("encode own shards", ar.encode_shards, delta, roster, codec, ef)
    # the shards this peer owns: the k members' contributions arrive and are decoded, reduced, re-encoded
    results, pending = list(others), []
    for j in mine:
        contributions = [encoded[j][0]] + [others[j]] * (k - 1)
        received = [timed("decode contributions", codec.decode, c, b[j + 1] - b[j]) for c in contributions]
        shard = ar.OwnedShard(roster, j, codec)
        items = [(m.weight, x) for m, x in zip(roster.members, received, strict=True)]
        results[j], residual = timed("reduce + re-encode owned", shard._reduce_encode, items, owner_ef)
        pending.append(residual)
    avg = timed("decode results", empty_f32, b[-1])   # as member.run_round: each shard into its slice
    for j in range(n):
        timed("decode results", codec.decode, results[j], b[j + 1] - b[j], avg[b[j]:b[j + 1]])
    theta, momentum = timed("outer step", outer_step, state.theta, state.momentum, avg, LR, MOMENTUM,
                             scratch)
    new = GlobalState(theta, momentum, state.round + 1, state.global_samples + 64)
    timed("digest", new.digest)

    def settle():
        ar.apply_residuals(ef, codec, [u for _, u in encoded])
        ar.apply_residuals(owner_ef, codec, pending)
        log.add(state.round, True, codec.name, list(b), results, 64, new.digest())
    timed("residuals + update log", settle)
    timed("state snapshot", StateSnapshot.of, new, "bench")
    timed("state -> model", assign_flat_, params, new.theta)
    return new, parts


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--numel", type=int, default=BASE_NUMEL, help="values in theta (default: the base preset)")
    ap.add_argument("--members", type=int, default=4, help="group size k: this peer owns 1/k of the state")
    ap.add_argument("--codec", default="fp32")
    ap.add_argument("--rounds", type=int, default=3, help="rounds timed; the median of each part is shown")
    args = ap.parse_args()
    if args.numel < args.members or args.members < 1 or args.rounds < 1:
        ap.error("need --numel >= --members >= 1 and --rounds >= 1")
    codec = get_codec(args.codec)
    gen = torch.Generator().manual_seed(0)
    theta = torch.randn(args.numel, generator=gen)
    state = GlobalState(theta, torch.randn(args.numel, generator=gen).mul_(0.01), 5, 1000)
    params = model_params(args.numel)
    assign_flat_(params, theta)
    host = torch.empty(args.numel)
    members = [pb.Member(peer_id=f"peer{i}", address=f"127.0.0.1:{i + 1}", weight=1.0 + i, samples=16)
               for i in range(args.members)]
    ef, owner_ef = ErrorFeedback(), ErrorFeedback()
    ef.load_state_dict({"residual": torch.zeros(args.numel)})     # as after the first applied round
    owner_ef.load_state_dict({"residual": torch.zeros(args.numel)})
    log = UpdateLog()
    scratch = torch.empty(args.numel)   # the keeper's recycled outer-step intermediate
    rows: list[dict[str, float]] = []
    copy_s, held_s = [], []
    held = torch.zeros(args.numel)
    for _ in range(args.rounds):
        roster = make_roster(state.round, "peer0", members, codec.name, args.numel)
        b = roster.shard_bounds
        others = [codec.encode(torch.randn(b[j + 1] - b[j], generator=gen).mul_(1e-3)) for j in range(len(roster.owners))]
        copy_s.append(clone_seconds(state.theta))
        held_s.append(held_copy_seconds(state.theta, held))
        state, parts = await one_round(state, params, host, roster, codec, ef, owner_ef, others, log, gen,
                                       scratch)
        rows.append(parts)
    copy, held_copy = statistics.median(copy_s), statistics.median(held_s)
    print(f"{args.numel} values ({4 * args.numel / 1e6:.1f} MB of theta), k = {args.members}, {codec.name}, "
          f"{torch.get_num_threads()} torch threads, median of {args.rounds} rounds; one copy: theta.clone() "
          f"= {copy * 1e3:.1f} ms, into held memory = {held_copy * 1e3:.1f} ms; shared machine: figures are noisy")
    print(f"{HUGE_PAGES} (DILOCO_HUGE_PAGES=off for 4 KiB pages)")
    print(f"{'part':28} {'ms':>9} {'clones':>7} {'held copies':>11}")
    total = 0.0
    for name in rows[0]:
        s = statistics.median(r[name] for r in rows)
        total += s
        print(f"{name:28} {s * 1e3:9.1f} {s / copy:7.2f} {s / held_copy:11.2f}")
    print(f"{'total':28} {total * 1e3:9.1f} {total / copy:7.2f} {total / held_copy:11.2f}")


if __name__ == "__main__":
    asyncio.run(main())
