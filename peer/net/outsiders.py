"""A private peer that sees its run only in records without a valid member proof (peer.records) asks
their peers who they are before it starts a run of its own: a peer of the run refuses a call that
carries another secret, and that refusal is this peer's one line and exit status 3. A stranger that
answers, or nobody, changes nothing. Runs on the network loop; every call has a deadline."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import grpc

from peer._proto import peer_pb2 as pb
from peer.net import swarm
from peer.net.auth import AuthRefused, describe_secret_refusal

if TYPE_CHECKING:
    from peer.net.core import NetCore

log = logging.getLogger(__name__)
ASK_PEERS = 3        # outsiders asked at most
ASK_TIMEOUT_S = 3.0  # each call


async def ask(core: NetCore) -> None:
    """Raises AuthRefused when a peer whose records this private peer skips refuses its secret."""
    found = await swarm.read_all(core.dht, swarm.peers_key(core.run_id), 5.0)
    records = [swarm.PeerRecord.parse(p, v) for p, v in found.outsiders.items()]
    addresses = sorted({r.addr for r in records if r is not None and r.addr and r.fresh()})[:ASK_PEERS]
    if not addresses:
        return
    lines = await asyncio.gather(*(_refusal(core, a) for a in addresses))
    line = next((x for x in lines if x), None)
    if line is not None:
        raise AuthRefused(line)
    log.warning("run %s: %d peer(s) publish records without this private run's member proof and do not refuse "
                "this peer's secret: strangers, ignored", core.run_id, len(found.outsiders))


async def _refusal(core: NetCore, address: str) -> str | None:
    """The one line to exit with when the peer at `address` refuses our run secret, else None."""
    try:
        await core.channels.stub(address).Health(pb.HealthRequest(), timeout=ASK_TIMEOUT_S)
    except grpc.aio.AioRpcError as e:
        if e.code() == grpc.StatusCode.UNAUTHENTICATED:
            return describe_secret_refusal(e.details() or "")
    return None
