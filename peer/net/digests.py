"""State digests in the DHT: each peer publishes the digest of every state it applies under its
own signed subkey of the round's key (swarm.digest_key); the keeper compares its own with those
the live peers signed (Keeper.check_digest) and checks a downloaded state against a quorum of
them (`disputed`). Runs on the network loop."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from peer.net import swarm
from peer.net.loop import Deadline
from peer.outer import GlobalState

if TYPE_CHECKING:
    from peer.net.core import NetCore

log = logging.getLogger(__name__)
DIGEST_WAIT_S = 3.0       # how long to wait for the digests of the live peers at our round


async def publish(core: NetCore, state: GlobalState) -> None:
    key = swarm.digest_key(core.run_id, state.round)
    try:
        await swarm.store(core.dht, key, state.digest(), 5.0)
    except TimeoutError as e:
        log.warning("round %d: publishing our digest: %s", state.round, e)


async def live(core: NetCore, state: GlobalState, expected: set[str]) -> dict[str, str]:
    """The digests that live peers published for the state's round, ours included, after
    waiting (at most DIGEST_WAIT_S) for those of `expected` and of every live peer there."""
    deadline = Deadline(DIGEST_WAIT_S)
    key = swarm.digest_key(core.run_id, state.round)
    while True:
        try:
            raw = await swarm.read(core.dht, key, 5.0)
        except TimeoutError as e:
            log.info("round %d: reading the digests: %s", state.round, e)
            raw = {}
        peers = {r.peer_id: r for r in core.live_peers()}
        signed = {p: d for p, d in raw.items() if isinstance(d, str) and p in peers}
        signed[core.peer_id] = state.digest()
        want = (expected & set(peers)) | {p for p, r in peers.items() if r.state_round == state.round}
        if want <= set(signed) or deadline.expired():
            return signed
        await asyncio.sleep(0.2)


async def disputed(core: NetCore, state: GlobalState) -> str:
    """Why a state we got is not the one a quorum of the live signers published for its round
    (`swarm.trusted_digest`; "" when it is, or when no digest has a quorum of at least two
    signers yet)."""
    raw = await swarm.read(core.dht, swarm.digest_key(core.run_id, state.round), 5.0)
    peers = {r.peer_id for r in core.live_peers()}
    signed = {p: d for p, d in raw.items() if isinstance(d, str) and p in peers}
    best, count = swarm.trusted_digest(signed)
    if best is None or count < 2 or best == state.digest():
        return ""
    return (f"the state of round {state.round} has digest {state.digest()[:12]}, "
            f"{count} live peers published {best[:12]}")
