"""The owner's side of the butterfly, on the network loop: accept whole, checked contributions
for the shards this peer owns (or reduces again as a dead owner's backup), reduce them once,
and serve the result, also again from a member that pulled it when its owner died."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import grpc

from peer._proto import peer_pb2 as pb
from peer.aggregate import Aggregator, aggregator, weighted_mean
from peer.codecs import CodecError, get_codec
from peer.config import verifies_shards
from peer.feedback import ErrorFeedback
from peer.net import allreduce as ar
from peer.net import validate
from peer.net.client import Reject
from peer.net.loop import Deadline

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from peer.net.core import NetCore, RoundCtx


def aggregator_of(core: NetCore) -> Aggregator:
    """The reduction the run's spec names; every member's spec hash is ours, so every owner of the
    round reduces alike (the mean before a spec is adopted: no round runs then)."""
    s = core.spec
    return weighted_mean if s is None else aggregator(s.aggregator, s.trim_fraction, s.clip_tau, s.clip_iters)


def verifying(core: NetCore) -> bool:
    """--verify-shards in force: every shard is reduced by its owner and its backup (peer.net.verify)."""
    return core.spec is not None and verifies_shards(core.spec)


def own_shards(core: NetCore, ctx: RoundCtx, roster: pb.Roster) -> None:
    """Starts the reduction of every shard this peer owns in the round, and with --verify-shards of
    every shard it backs up. Verified shards are reduced without owner error feedback: the owner
    and its backup then give the same bytes (the residual of re-encoding is not carried)."""
    codec = get_codec(roster.codec)
    verify = verifying(core)
    for j, owner in enumerate(roster.owners):
        if owner == core.peer_id and j not in ctx.owned:
            shard = ar.OwnedShard(roster, j, codec, aggregate=aggregator_of(core),
                                  lie=core.faults.owner_factor(roster.round))
            ctx.owned[j] = shard
            shard.task = asyncio.ensure_future(shard.reduce_at(core.transfer_timeout_s(),
                                                               ErrorFeedback() if verify else core.owner_ef))
        if verify and ar.backup_owner(roster, j) == core.peer_id:
            backup_shard(core, ctx, roster, j)


def backup_shard(core: NetCore, ctx: RoundCtx, roster: pb.Roster, j: int) -> ar.OwnedShard:
    """The reduction of shard j again, here as its backup owner: without its dead owner, or (with
    --verify-shards) from every member, the owner included, as the owner's check. Its
    error-feedback residual is not kept: this peer does not own these values next round."""
    if j not in ctx.backups:
        shard = ar.OwnedShard(roster, j, get_codec(roster.codec), absent="" if verifying(core) else roster.owners[j],
                              aggregate=aggregator_of(core))
        ctx.backups[j] = shard
        shard.task = asyncio.ensure_future(shard.reduce_at(core.transfer_timeout_s(), ErrorFeedback()))
    return ctx.backups[j]


async def roster_of(core: NetCore, round_: int, roster_hash: str) -> tuple[RoundCtx, pb.Roster]:
    """The round's context and roster, when the caller's roster hash is ours."""
    if round_ > core.round:   # a peer joins a round's group only once it is at that round (begin_round)
        raise Reject(grpc.StatusCode.FAILED_PRECONDITION, f"round {round_} is ahead of this peer (at {core.round})")
    ctx = core.ctx(round_)
    if ctx is None:
        raise Reject(grpc.StatusCode.FAILED_PRECONDITION, f"round {round_} is over here (at {core.round})")
    if not ctx.roster.done() and round_ < core.round:  # we finished that round outside any group
        raise Reject(grpc.StatusCode.FAILED_PRECONDITION, f"round {round_}: not in a group here (at {core.round})")
    try:
        roster = await asyncio.wait_for(asyncio.shield(ctx.roster), core.join_window_s() + 10)
    except asyncio.TimeoutError:
        raise Reject(grpc.StatusCode.FAILED_PRECONDITION, f"round {round_}: not in a group here") from None
    if roster.hash != roster_hash:
        raise Reject(grpc.StatusCode.FAILED_PRECONDITION,
                     f"round {round_}: roster {roster_hash[:8]} is not ours ({roster.hash[:8]})")
    return ctx, roster


async def handle_contribute(core: NetCore, stream) -> pb.ContributeReply:
    try:
        first = await asyncio.wait_for(stream.__anext__(), core.transfer_timeout_s())
    except StopAsyncIteration:
        raise Reject(grpc.StatusCode.INVALID_ARGUMENT, "empty Contribute stream") from None
    h = first.header
    try:
        return await _take_part(core, h, first, stream)
    except (Reject, ValueError) as e:   # named with its sender: a hostile member is seen in the owner's log
        claimed = "" if h.round == core.round else f" (its header names round {h.round})"
        log.warning("round %d: refused %s's part of shard %d%s: %s", core.round, h.sender[-6:], h.shard, claimed,
                    str(e).removeprefix(f"round {h.round}: ")[:300])
        raise


async def _take_part(core: NetCore, h: pb.ShardHeader, first: pb.ShardChunk, stream) -> pb.ContributeReply:
    """Checks a part (its header against the roster, its bytes against the header, its values) and
    adds it to the shard, or drops it (accepted=False); raises Reject or ValueError to refuse it."""
    ctx, roster = await roster_of(core, h.round, h.roster_hash)
    claimed = _claimed_shard(ctx, roster, h)
    try:
        return await _checked_part(core, ctx, roster, h, first, stream)
    except (Reject, ValueError) as e:   # a member's bad part for this round: the shard waits no longer for it
        if claimed is not None and h.sender not in claimed.parts and h.sender not in claimed.refused:
            claimed.refuse(h.sender, str(e)[:300])
        raise


def _claimed_shard(ctx: RoundCtx, roster: pb.Roster, h: pb.ShardHeader) -> ar.OwnedShard | None:
    """The shard reduced here that a roster member's part names (its sender is the signed caller:
    nobody can speak for another), or None: a part of it refused for its header or its bytes is that
    member's part of the round, so the owner stops waiting for it instead of waiting the transfer timeout."""
    if h.sender not in {m.peer_id for m in roster.members} or not 0 <= h.shard < len(roster.owners):
        return None
    return (ctx.backups if h.backup else ctx.owned).get(h.shard)


async def _checked_part(core: NetCore, ctx: RoundCtx, roster: pb.Roster, h: pb.ShardHeader, first: pb.ShardChunk,
                        stream) -> pb.ContributeReply:
    codec = get_codec(roster.codec)
    why = ar.check_header(h, roster, codec, reduced=False)
    if why is None:  # the header's shard index is valid from here on
        owner = roster.owners[h.shard]
        if (ar.backup_owner(roster, h.shard) if h.backup else owner) != core.peer_id:
            why = f"shard {h.shard} is {'backed up' if h.backup else 'owned'} by another peer, not here"
        elif h.backup and h.sender == owner and not verifying(core):
            why = f"the owner of shard {h.shard} cannot contribute to its backup"
    if why:
        raise Reject(grpc.StatusCode.INVALID_ARGUMENT, f"round {h.round}: {why}")
    shard = backup_shard(core, ctx, roster, h.shard) if h.backup else ctx.owned[h.shard]
    if h.sender in shard.parts or h.sender in shard.refused:   # parts: every part taken, kept after the reduction
        raise Reject(grpc.StatusCode.ALREADY_EXISTS, f"round {h.round}: shard {h.shard} has {h.sender[-6:]}'s part already")
    if shard.closed:
        raise Reject(grpc.StatusCode.FAILED_PRECONDITION,
                     f"round {h.round}: shard {h.shard} is reduced already; {h.sender[-6:]}'s part came too late")
    mac = core.signer.macs.contribution(h)   # a MacError (a ValueError) is logged by handle_contribute
    mac.check(0, first)
    payload = await ar.read_payload(first, stream, h.num_bytes, mac)
    ctx.bytes_received += len(payload)
    try:   # a codec refuses what does not decode to finite values (fp32: NaN or infinity), like validation;
        # fp32: the values are the received buffer itself (decode_view), checked, never copied
        values = await asyncio.get_running_loop().run_in_executor(None, codec.decode_view, payload, h.numel)
        why = validate.contribution(values)
    except CodecError as e:
        why = str(e)
    if why:   # dropped for this round: the shard is reduced without it, at once if everyone else is in
        log.warning("round %d: dropped %s's part of shard %d: %s", h.round, h.sender[-6:], h.shard, why)
        shard.refuse(h.sender, why)
        return pb.ContributeReply(accepted=False, reason=why)
    if shard.closed or h.sender in shard.parts:   # reduced, or another stream of the sender's taken, meanwhile
        return pb.ContributeReply(accepted=False, reason=f"shard {h.shard} was reduced, or had this part, before it "
                                                         "arrived whole")
    shard.add(h.sender, values, h.sha256)
    return pb.ContributeReply(accepted=True)


async def handle_get_shard(core: NetCore, req: pb.ShardRequest) -> list[pb.ShardChunk]:
    ctx, roster = await roster_of(core, req.round, req.roster_hash)
    shard = (ctx.backups if req.backup else ctx.owned).get(req.shard)
    if shard is None:  # serve it again if we pulled it: its owner may have died
        if req.backup or req.shard not in ctx.fetched:
            what = "a backup of shard" if req.backup else "shard"
            raise Reject(grpc.StatusCode.NOT_FOUND, f"round {req.round}: {what} {req.shard} is not held here")
        header, payload = ctx.fetched[req.shard]
        ctx.bytes_sent += len(payload)
        return ar.chunks(header, payload, core.signer.macs.shard(req, core.peer_id))
    try:
        header, payload = await asyncio.wait_for(asyncio.shield(shard.result), min(req.wait_s, 600))
    except asyncio.TimeoutError:
        raise Reject(grpc.StatusCode.DEADLINE_EXCEEDED, f"round {req.round}: shard {req.shard} not ready") from None
    except RuntimeError as e:
        raise Reject(grpc.StatusCode.ABORTED, f"round {req.round}: {e}") from None
    if req.header_only:   # a member checking the result's hash (--verify-shards)
        shard.served.add(req.requester)
        return [core.signer.macs.shard(req, core.peer_id).seal(0, pb.ShardChunk(header=header))]
    core.faults.hit("serving_shard", req.round)
    shard.served.add(req.requester)
    ctx.bytes_sent += len(payload)
    return ar.chunks(header, payload, core.signer.macs.shard(req, core.peer_id))


async def drain(core: NetCore, deadline: Deadline) -> None:
    """Waits until the members fetched every shard result this peer owns (SIGTERM)."""
    said = False
    ctx = core.rounds.get(core.round)  # rounds before it committed: every member fetched them
    while ctx is not None and not deadline.expired():
        waiting = {str(j): shard.pending_fetches() for j, shard in ctx.owned.items()}
        if core.spec is not None and verifies_shards(core.spec):   # the owners' checks read our headers
            waiting |= {f"{j} (backup)": shard.pending_fetches(core.peer_id) for j, shard in ctx.backups.items()}
        waiting = {j: v for j, v in waiting.items() if v}
        deciding = ctx.group is not None and ctx.group.closed and not ctx.group.decision.done()
        if not waiting and not deciding:
            return
        if not said:
            log.info("round %d: leaving after serving %s", core.round, "; ".join(
                f"shard {j} to {', '.join(p[-6:] for p in sorted(v))}" for j, v in waiting.items()))
            said = True
        await asyncio.sleep(0.1)
    if ctx is None:
        return
    raise TimeoutError("members did not fetch every owned shard before the deadline")
