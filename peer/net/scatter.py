"""A member's reduce-scatter side of a round: its part of a shard (piece) streamed to the shard's owner
and, with --verify-shards, its backup owner; a part for itself handed to its own owner side."""

from __future__ import annotations

import asyncio
import logging
import time

import grpc

from peer._proto import peer_pb2 as pb
from peer.codecs import get_codec
from peer.net import allreduce as ar
from peer.net import owner as owner_side
from peer.net.client import EndedEarly, describe_rpc_error, sent
from peer.net.core import NetCore
from peer.net.loop import Deadline
from peer.net.upload import MIN_SAMPLE_BYTES, paced

log = logging.getLogger(__name__)


async def send_parts(core: NetCore, ctx, roster: pb.Roster, j: int, payload: bytes, deadline: Deadline,
                     written: asyncio.Event | None = None) -> None:
    """Our part of shard j to its owner, and with --verify-shards to its backup owner as well
    (at once: the two streams share our uplink); `written` is set once the owner's copy is written."""
    if owner_side.verifying(core) and ar.backup_owner(roster, j):
        await asyncio.gather(send_shard(core, ctx, roster, j, payload, deadline, written=written),
                             send_shard(core, ctx, roster, j, payload, deadline, backup=True))
    else:
        await send_shard(core, ctx, roster, j, payload, deadline, written=written)


async def written_then(chunks, written: asyncio.Event | None):
    """The chunks of a stream; `written` is set once gRPC asked past the last (all handed to it)."""
    try:
        async for chunk in chunks:
            yield chunk
    finally:
        if written is not None:
            written.set()


async def send_shard(core: NetCore, ctx, roster: pb.Roster, j: int, payload: bytes, deadline: Deadline,
                     backup: bool = False, written: asyncio.Event | None = None) -> None:
    """Streams one shard to its owner (or its backup owner); a failure is logged and leaves
    the shard without us (ctx.accepted records where it was taken). `written`: set once the
    stream's bytes are all handed to gRPC (a send chain's next piece may start then)."""
    owner = ar.backup_owner(roster, j) if backup else roster.owners[j]
    header = ar.contribution_header(roster, core.peer_id, j, get_codec(roster.codec), payload, backup)
    if owner == core.peer_id:
        values = await asyncio.get_running_loop().run_in_executor(
            None, ar.local_values, get_codec(roster.codec), payload, header.numel)
        (owner_side.backup_shard(core, ctx, roster, j) if backup else ctx.owned[j]).add(core.peer_id, values,
                                                                                         header.sha256)
        ctx.accepted.add((j, backup))
        return
    address = next(m.address for m in roster.members if m.peer_id == owner)
    header, payload = core.faults.sent_part(roster.round, header, payload)   # a test's hostile member only
    try:
        started = time.monotonic()
        reply = await sent(core.channels.stub(address).Contribute(
            written_then(paced(core.upload, ar.chunks(header, payload, core.signer.macs.contribution(header))),
                         written),
            timeout=min(deadline.left(0.1), core.transfer_timeout_s())))
        took = time.monotonic() - started
        core.deadlines.observe(len(payload), took)
        ctx.bytes_sent += len(payload)
        if not backup and len(payload) >= MIN_SAMPLE_BYTES and took > 0:   # one chain per owner
            sent_before, began = ctx.send_rates.get(owner, (0, started))[:2]
            ctx.send_rates[owner] = (sent_before + len(payload), min(began, started), started + took)
        if not reply.accepted:
            log.warning("round %d: owner %s refused shard %d: %s", roster.round, owner[-6:], j, reply.reason)
        else:
            ctx.accepted.add((j, backup))
    except grpc.aio.AioRpcError as e:
        ctx.unreachable.add(owner)
        core.suspect(owner, e)
        log.warning("round %d: sending shard %d to %s failed: %s", roster.round, j, owner[-6:], describe_rpc_error(e))
    except EndedEarly as e:   # it answered (a refusal), so it is not unreachable
        log.warning("round %d: owner %s refused shard %d: %s", roster.round, owner[-6:], j, e)
