"""The shard map of a round: which serving members own a shard and its bounds (by upload rate,
or equal), and the cut of each owner's range into pieces. Pure and integer-only: a leader computes
it, every member can recompute it (peer.net.round.make_roster), every machine gets the same bounds."""

from __future__ import annotations

import math

from peer.net import validate

SHARD_ALIGN = 4096     # shard bounds are multiples of this many values, so codec blocks and chunks line up
SLOW_FRACTION = 8      # a serving member whose upload rate is under 1/8 of the median owns no shard
RATE_UNIT_BPS = 1024   # rates count in whole KiB/s: the plan is integer arithmetic, the same everywhere
PIECE_BYTES = 2 << 20  # an owner's range is cut into pieces of at least this many encoded bytes, at most
                       # validate.MAX_PIECES of them: each is reduced and served on its own (see pieces) ...
PIECE_S = 0.25         # ... and of what the slowest serving member uploads in this many seconds: a piece
                       # costs calls and executor hops (~3 ms each), which only a slow link hides


def shard_plan(numel: int, peers: list[str], rates: list[float], align: int = SHARD_ALIGN
               ) -> tuple[list[str], list[int]]:
    """Which serving members own a shard, and the bounds: owners[i] owns [bounds[i], bounds[i+1]).
    `rates`: each peer's announced upload rate in bytes/s (0 or not finite: not known; such a
    peer counts at the median of the known ones, and with none known all shards are equal).
    A peer under 1/SLOW_FRACTION of the median (the lower median of the known rates) owns
    nothing; the others own shards proportional to their rates, each at least one unit, in
    units of `align` values (halved while there are fewer units than owners); the last shard
    ends at `numel`. Pure and integer-only: equal inputs give equal bounds on every machine."""
    if len(peers) != len(rates) or not peers:
        raise ValueError(f"a shard plan needs one rate per serving peer and at least one ({len(peers)} peers, "
                         f"{len(rates)} rates)")
    if numel < len(peers):
        raise ValueError(f"cannot split {numel} values among {len(peers)} shard owners")
    units = [max(1, int(r // RATE_UNIT_BPS)) if math.isfinite(r) and r > 0 else 0 for r in rates]
    known = sorted(u for u in units if u > 0)
    median = known[(len(known) - 1) // 2] if known else 1
    weights = [u or median for u in units]
    keep = [i for i, w in enumerate(weights) if w * SLOW_FRACTION >= median]   # the median peer stays
    owners, weights = [peers[i] for i in keep], [weights[i] for i in keep]
    n = len(owners)
    unit = max(1, align)
    while unit > 1 and numel // unit < n:
        unit //= 2
    free, total = numel // unit - n, sum(weights)       # every owner has one unit; the rest by weight
    quota = [free * w for w in weights]
    sizes = [1 + q // total for q in quota]
    short = numel // unit - sum(sizes)                  # largest remainders first, ties by order
    for i in sorted(range(n), key=lambda i: (-(quota[i] % total), i))[:short]:
        sizes[i] += 1
    bounds = [0]
    for size in sizes:
        bounds.append(bounds[-1] + size * unit)
    bounds[-1] = numel                                  # the last shard takes what no unit filled
    return owners, bounds


def pieces(owners: list[str], bounds: list[int], encoded_size, align: int = SHARD_ALIGN,
           piece_bytes: int = PIECE_BYTES) -> tuple[list[str], list[int]]:
    """Cuts every owner's range of a shard plan into pieces, each one shard of the roster (so the
    same owner is listed once per piece, its pieces next to each other): ceil(its encoded bytes /
    piece_bytes) of them (piece_size), at most validate.MAX_PIECES, of nearly equal size in units
    of `align` values. A piece is reduced as soon as every member's part of it is in, and served at
    once, so the all-gather of an owner's first pieces overlaps the reduce-scatter of its last
    ones (ARCHITECTURE.md section 5, steps 6-8). `encoded_size(numel)`: the codec's bytes for
    numel values. Pure and integer-only, like shard_plan."""
    out_owners, out_bounds = [], [0]
    for owner, start, end in zip(owners, bounds, bounds[1:], strict=False):
        units = max(1, (end - start) // align)
        count = max(1, min(validate.MAX_PIECES, units, -(-encoded_size(end - start) // piece_bytes)))
        for i in range(1, count + 1):
            out_owners.append(owner)
            out_bounds.append(end if i == count else start + (units * i // count) * align)
    return out_owners, out_bounds


def piece_size(rates: list[float]) -> int:
    """The encoded bytes of a piece (pieces): PIECE_BYTES, or what the slowest known serving member
    uploads in PIECE_S when that is more. On a slow link many pieces let its sends and its
    receives overlap (one peer at a quarter of the others' 100 Mbit/s: a round of 41 s took 30-32
    s); on a fast one the wire is not what a round waits for, and 8 pieces an owner made a loopback
    round of 64 MiB 30 % slower, all in the pieces' per-call work. `rates`: announced upload rates
    in bytes/s, 0 or not finite where unknown (none known: PIECE_BYTES)."""
    known = [r for r in rates if math.isfinite(r) and r > 0]
    return max(PIECE_BYTES, int(min(known) * PIECE_S)) if known else PIECE_BYTES
