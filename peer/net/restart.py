"""Restart after a full stop: nobody holds the run's state, every restarted peer has its own
checkpoint. Each publishes (round, digest) of its checkpoint; after a short gathering window
all pick the newest round, and for it the digest most checkpoints hold. A peer whose
checkpoint is not that one downloads the agreed state instead. Runs on the network loop."""

from __future__ import annotations

import asyncio
import logging

from hivemind.utils import get_dht_time

from peer.net import swarm
from peer.net.core import NetCore
from peer.net.loop import Deadline

log = logging.getLogger(__name__)
CLAIM_FRESH_S = 60.0   # a claim older than this is from an earlier restart


def claims_key(run_id: str) -> str:
    return f"{run_id}.checkpoints"


def parse_claims(raw: dict) -> dict[str, tuple[int, str]]:
    """Valid, fresh claims: {peer id: (round, digest)}; malformed ones are ignored."""
    out = {}
    now = get_dht_time()
    for peer, v in raw.items():
        try:
            r, d, t = int(v["round"]), str(v["digest"]), float(v["t"])
        except (KeyError, TypeError, ValueError):
            continue
        if r >= 0 and len(d) == 64 and now - t < CLAIM_FRESH_S:
            out[peer] = (r, d)
    return out


def choose(claims: dict[str, tuple[int, str]]) -> tuple[int, str, int, int]:
    """The newest round claimed and the digest most of its claims hold (ties: the smaller
    digest); returns (round, digest, claims for it, claims of that round)."""
    newest = max(r for r, _ in claims.values())
    at = {p: d for p, (r, d) in claims.items() if r == newest}
    best, count = swarm.majority_digest(at)
    assert best is not None
    return newest, best, count, len(at)


async def agree(core: NetCore, mine: tuple[int, str], want: int, deadline: Deadline) -> tuple[int, str, int, int]:
    """Publishes our claim and gathers the others' until `want` peers claimed, a live peer holds
    a state already, or the deadline; returns choose() of what was gathered."""
    key = claims_key(core.run_id)
    claims: dict[str, tuple[int, str]] = {}
    while True:
        value = {"round": mine[0], "digest": mine[1], "t": get_dht_time()}
        try:
            await swarm.store(core.dht, key, value, 5.0)
            claims = parse_claims(await swarm.read(core.dht, key, 5.0))
        except TimeoutError as e:
            log.warning("gathering the other peers' checkpoints: %s", e)
        claims[core.peer_id] = mine
        serving = [r for r in core.live_peers() if r.addr and r.state_round >= 0]
        if len(claims) >= want or serving or deadline.expired():
            break
        await asyncio.sleep(0.5)
    log.info("checkpoints of the restarting peers: %s", ", ".join(
        f"{p[-6:]} round {r} {d[:8]}" for p, (r, d) in sorted(claims.items())))
    return choose(claims)
