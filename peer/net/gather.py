"""A member's all-gather side of a round: a reduced shard pulled from its owner, or when the owner
fails from a member holding it, or reduced again by the backup owner; with --verify-shards checked
against the backup's reduction; decoded into its slice of the average."""

from __future__ import annotations

import asyncio
import logging
import sys
import time

import grpc
import torch

from peer._proto import peer_pb2 as pb
from peer.codecs import get_codec
from peer.net import allreduce as ar
from peer.net import owner as owner_side
from peer.net import validate, verify
from peer.net.chunkmac import MacError
from peer.net.client import describe_rpc_error
from peer.net.core import NetCore
from peer.net.loop import Deadline
from peer.net.scatter import send_shard

log = logging.getLogger(__name__)


async def fetch_shard(core: NetCore, ctx, roster: pb.Roster, j: int, mine: bytes, deadline: Deadline,
                      into: torch.Tensor | None = None) -> ar.ShardResult:
    """Pulls the reduced shard j from its owner; when the owner fails, from any member that
    fetched it already (the same bytes: the header's digest is checked); when none has it,
    from the backup owner, which reduces it again from the members' contributions (`mine`
    is ours). Decodes it (into `into` when given: shard j's slice of the average)."""
    owner = roster.owners[j]
    codec = get_codec(roster.codec)
    wait_s = min(deadline.left(0.1), 2 * core.transfer_timeout_s())
    check = None
    if owner_side.verifying(core) and ar.backup_owner(roster, j):   # the backup's header, meanwhile
        check = asyncio.ensure_future(backup_header(core, ctx, roster, j, wait_s))
    # fp32 from its owner: received straight into `into` (the payload is then a view of it)
    direct = into if codec.EXACT and sys.byteorder == "little" and into is not None and into.numel() else None
    try:
        header, payload = await reduced_shard(core, ctx, roster, j, mine, deadline, wait_s, verified=check is not None,
                                              into=direct)
        if check is not None:
            await verified(core, ctx, roster, j, header, await check, mine)
    finally:
        if check is not None and not check.done():
            check.cancel()
    if direct is not None and ar.holds(payload, direct):
        values = await asyncio.get_running_loop().run_in_executor(None, codec.decode_view, payload, header.numel)
    else:
        values = await asyncio.get_running_loop().run_in_executor(None, codec.decode, payload, header.numel, into)
    why = validate.contribution(values)
    if why:   # an owner's lie (or a broken one): never averaged in, nor served to others as the shard
        raise RuntimeError(f"round {roster.round}: the reduced shard {j} (owner {owner[-6:]}) holds {why}")
    ctx.fetched[j] = (header, payload)
    return ar.ShardResult(header, payload, values)


async def reduced_shard(core: NetCore, ctx, roster: pb.Roster, j: int, mine: bytes, deadline: Deadline,
                        wait_s: float, verified: bool, into: torch.Tensor | None = None) -> tuple[pb.ShardHeader, bytes]:
    """Shard j's reduced header and bytes: ours, the owner's, a member's copy, or (not verified) the
    backup owner's reduction again without the owner. A verified shard is never taken from its
    backup alone: its reduction is the check, not a second source. `into`: fp32 values the owner's
    bytes are received into (pull_shard)."""
    owner = roster.owners[j]
    if owner == core.peer_id:
        header, payload = await asyncio.wait_for(asyncio.shield(ctx.owned[j].result), wait_s)
    else:
        try:
            header, payload = await pull_shard(core, roster, j, owner, wait_s, into=into)
        except RuntimeError as e:
            ctx.unreachable.add(owner)
            try:
                header, payload = await pull_from_members(core, roster, j, deadline, str(e))
            except RuntimeError as e:
                if verified:
                    raise
                header, payload = await reduce_again(core, ctx, roster, j, mine, deadline, str(e))
        ctx.bytes_received += len(payload)
    return header, payload


async def backup_header(core: NetCore, ctx, roster: pb.Roster, j: int, wait_s: float) -> pb.ShardHeader:
    """The header of the backup owner's reduction of shard j (--verify-shards)."""
    backup = ar.backup_owner(roster, j)
    try:
        if backup == core.peer_id:
            header, _ = await asyncio.wait_for(asyncio.shield(ctx.backups[j].result), wait_s)
            return header
        header, _ = await pull_shard(core, roster, j, backup, wait_s, backup=True, header_only=True)
        return header
    except (RuntimeError, asyncio.TimeoutError) as e:
        raise RuntimeError(f"cannot be verified: its backup owner {backup[-6:]} gave no result "
                           f"({e or 'none in time'})") from None


async def verified(core: NetCore, ctx, roster: pb.Roster, j: int, header: pb.ShardHeader, other: pb.ShardHeader,
                   mine: bytes) -> None:
    """Raises unless the owner's and the backup's reductions of shard j agree (peer.net.verify);
    a disagreement makes this peer suspect whom it points at."""
    owner, backup = roster.owners[j], ar.backup_owner(roster, j)
    both = {(j, False), (j, True)} <= ctx.accepted
    mismatch = verify.compare(owner, header, backup, other, core.peer_id, ar.payload_digest(mine) if both else "")
    if mismatch is not None:
        core.suspects.add(roster.round, j, mismatch)
        raise RuntimeError(f"owner {owner[-6:]} and backup owner {backup[-6:]} reduced it differently: "
                           f"{mismatch.reason}; not applied")


async def pull_shard(core: NetCore, roster: pb.Roster, j: int, source: str, wait_s: float, backup: bool = False,
                     header_only: bool = False, into: torch.Tensor | None = None
                     ) -> tuple[pb.ShardHeader, bytearray | memoryview]:
    """One GetShard call to `source` (the owner, a member holding the result, or the backup owner);
    `header_only`: just the reduced header (its bytes are not read); `into`: float32 values whose
    memory takes the (fp32) payload, which is then a read-only view of it."""
    address = next(m.address for m in roster.members if m.peer_id == source)
    req = pb.ShardRequest(round=roster.round, roster_hash=roster.hash, shard=j, requester=core.peer_id,
                          wait_s=wait_s, backup=backup, header_only=header_only)
    mac = core.signer.macs.shard(req, source)
    try:
        call = core.channels.stub(address).GetShard(req, timeout=wait_s + 5)
        first = await call.read()
        if first is grpc.aio.EOF:
            raise RuntimeError(f"{source[-6:]} sent nothing")
        mac.check(0, first)   # the reply's header is not signed: its MAC covers it
        why = ar.check_header(first.header, roster, get_codec(roster.codec), reduced=True)
        if why:
            raise RuntimeError(f"{source[-6:]}: {why}")
        if header_only:
            return first.header, bytearray()
        started = time.monotonic()  # the owner may hold the call until the shard is reduced: time the bytes
        payload = await ar.read_payload(first, ar.rest_of(call), first.header.num_bytes, mac,
                                        None if into is None else ar.byte_view(into))
        core.deadlines.observe(len(payload) - len(first.data), time.monotonic() - started)
    except grpc.aio.AioRpcError as e:
        core.suspect(source, e)
        raise RuntimeError(f"{source[-6:]}: {describe_rpc_error(e)}") from None
    except MacError as e:
        log.warning("%s", e)
        raise RuntimeError(str(e)) from None
    except ValueError as e:
        raise RuntimeError(f"{source[-6:]}: {e}") from None
    return first.header, payload


async def pull_from_members(core: NetCore, roster: pb.Roster, j: int, deadline: Deadline, owner_error: str
                            ) -> tuple[pb.ShardHeader, bytes]:
    """The owner of shard j failed: asks the other serving members, which may have fetched it."""
    others = [m.peer_id for m in roster.members
              if m.peer_id not in (core.peer_id, roster.owners[j]) and not m.client_mode]
    errors = [f"owner {owner_error}"]
    deadline = deadline.sub(core.transfer_timeout_s())  # they fetch at about the same time as we do
    while others and not deadline.expired():
        for source in others:
            try:
                found = await pull_shard(core, roster, j, source, min(1.0, deadline.left(0.1)))
                log.info("round %d: shard %d served again by %s (its owner failed: %s)",
                         roster.round, j, source[-6:], owner_error)
                return found
            except RuntimeError as e:
                errors.append(str(e))
        await asyncio.sleep(0.5)
    raise RuntimeError("; ".join(errors[:3]))


async def reduce_again(core: NetCore, ctx, roster: pb.Roster, j: int, mine: bytes, deadline: Deadline,
                       why: str) -> tuple[pb.ShardHeader, bytes]:
    """No member holds the result of shard j: every member sends its part of shard j to the
    shard's backup owner, which reduces it again without the dead owner, and pulls that."""
    backup = ar.backup_owner(roster, j)
    if not backup or backup == roster.owners[j] or deadline.expired():
        raise RuntimeError(why)
    log.warning("round %d: shard %d: no member holds its result (%s); its backup owner %s reduces it again",
                roster.round, j, why, backup[-6:])
    await send_shard(core, ctx, roster, j, mine, deadline, backup=True)
    wait_s = min(deadline.left(0.1), 2 * core.transfer_timeout_s())
    try:
        if backup == core.peer_id:
            return await asyncio.wait_for(asyncio.shield(ctx.backups[j].result), wait_s)
        return await pull_shard(core, roster, j, backup, wait_s, backup=True)
    except (RuntimeError, asyncio.TimeoutError) as e:
        raise RuntimeError(f"{why}; backup owner {backup[-6:]}: {e or 'no result in time'}") from None
