"""A copied key file: before a peer publishes its first record it looks for a live record of its own
id in the run, and stops (DuplicateIdentity, exit 3) when another process holds that id. hivemind's
own check at DHT start looks the id up in libp2p's routing table and misses a peer that joined
moments before. Runs on the network loop; every call has a deadline."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import grpc

from peer._proto import peer_pb2 as pb
from peer.dht import DuplicateIdentity
from peer.net import swarm

if TYPE_CHECKING:
    from peer.net.core import NetCore

log = logging.getLogger(__name__)
HEALTH_TIMEOUT_S = 3.0
WATCH_S = 2.0   # four refresh periods: a live holder re-publishes its record within it


async def check(core: NetCore, key_file: str) -> None:
    """Raises DuplicateIdentity when a live process other than this one publishes records as our id:
    it answers Health at its record's address with our id, or (no address: client mode) its record
    is refreshed while we watch. A record left by our own previous run (a restart) is neither."""
    first = await _own_record(core)
    if first is None:
        return
    if first.addr and first.addr != core.address:
        try:
            reply = await core.channels.stub(first.addr).Health(pb.HealthRequest(), timeout=HEALTH_TIMEOUT_S)
            if reply.peer_id == core.peer_id:
                raise DuplicateIdentity(_line(key_file, f"it answers at {first.addr}"))
        except grpc.aio.AioRpcError as e:
            log.debug("our id's record names %s, which does not answer (%s): a previous run of ours",
                      first.addr, e.code().name)
    await asyncio.sleep(WATCH_S)
    later = await _own_record(core)
    if later is not None and later.t > first.t:
        raise DuplicateIdentity(_line(key_file, "its record is refreshed as we watch"))


async def _own_record(core: NetCore) -> swarm.PeerRecord | None:
    try:
        found = await swarm.read(core.dht, swarm.peers_key(core.run_id), 5.0)
    except Exception as e:   # a slow DHT must not stop a start: hivemind's check has run already
        log.warning("could not read the run's records to look for another peer with our id: %s", e)
        return None
    rec = swarm.PeerRecord.parse(core.peer_id, found[core.peer_id]) if core.peer_id in found else None
    return rec if rec is not None and rec.fresh() else None


def _line(key_file: str, how: str) -> str:
    return (f"another running peer has this peer's id ({how}): its key file {key_file or '(in memory)'} was "
            "copied or is used twice; give each peer its own --identity-file (or --checkpoint-dir)")
