"""A member's whole round on the network loop: join the group, send every shard to its owner,
pull every reduced shard, report the hashes to the leader and end with one Outcome."""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
import torch

from peer._proto import peer_pb2 as pb
from peer.codecs import get_codec
from peer.hostmem import empty_f32
from peer.net import allreduce as ar
from peer.net import group, swarm
from peer.net import owner as owner_side
from peer.net.client import describe_rpc_error
from peer.net.core import NetCore
from peer.net.gather import fetch_shard
from peer.net.loop import Deadline, set_or_done
from peer.net.round import Outcome, drop_reasons
from peer.net.scatter import send_parts

log = logging.getLogger(__name__)


async def run_round(core: NetCore, r: int, delta: torch.Tensor, weight: float, samples: int,
                    carried: tuple[float, int] = (0.0, -1)) -> Outcome:
    """Never raises for a network failure: the Outcome says what happened."""
    deadline = Deadline(core.join_window_s() + 20 + 3 * core.transfer_timeout_s())
    member = pb.Member(peer_id=core.peer_id, address="" if core.client_mode else core.address,
                       weight=weight, samples=samples, client_mode=core.client_mode,
                       carried_weight=carried[0], carried_round=carried[1], upload_bps=core.upload_bps())
    for _ in range(3):  # a view from before a long step or a SIGSTOP would mislead the join
        try:
            await core.refresh()
            break
        except Exception as e:
            log.warning("round %d: DHT refresh before joining failed: %s", r, e)
    if time.monotonic() - core.viewed_at > swarm.FRESH_S:  # we might believe we are alone
        return Outcome("excluded", reason=f"no view of the swarm for {time.monotonic() - core.viewed_at:.0f} s")
    try:
        roster = await group.join_round(core, r, member, deadline)
    except (TimeoutError, RuntimeError) as e:
        return Outcome("excluded", reason=str(e))
    if roster is None:
        return Outcome("excluded", reason="the round closed without us")
    ctx = core.ctx(r)
    if ctx is None:
        return Outcome("excluded", reason=f"round {r} is no longer current")
    if not ctx.roster.done():
        ctx.roster.set_result(roster)
    core.last_group = (r, {m.peer_id: m.address for m in roster.members if not m.client_mode and m.address})
    owner_side.own_shards(core, ctx, roster)
    core.faults.hit("after_join", r)
    avg = empty_f32(roster.numel)   # each reduced shard is decoded into its slice
    encoded, results = await send_and_fetch(core, ctx, roster, delta, deadline, avg)
    failures = [f"shard {j}: {res}" for j, res in enumerate(results) if isinstance(res, BaseException)]
    shards = [res for res in results if isinstance(res, ar.ShardResult)]
    report = pb.CommitRequest(round=r, roster_hash=roster.hash, peer_id=core.peer_id, ok=not failures,
                              shard_sha256=[s.header.sha256 for s in shards], reason="; ".join(failures),
                              unreachable=sorted(ctx.unreachable))
    decision, decided = await commit(core, roster, report, deadline)
    out = Outcome("aborted", reason=decision.reason, decided=decided, roster=roster,
                  bytes_sent=ctx.bytes_sent, bytes_received=ctx.bytes_received)
    if not decision.apply:
        return out
    if list(decision.shard_sha256) != list(report.shard_sha256):  # decided without our report
        out.kind, out.reason = "excluded", "the round applied with results other than ours"
        return out
    mine = [(j, s) for j, s in enumerate(shards) if core.peer_id in s.header.contributors]
    out.residuals = [encoded[j][1] for j, _ in mine]   # applied with the new state (keeper.py)
    out.owner_residuals = [] if owner_side.verifying(core) else [  # verified: reduced without (own_shards)
        shard.pending_residual for shard in ctx.owned.values() if shard.pending_residual is not None]
    members = {m.peer_id: m for m in roster.members}
    out.kind, out.reason = "applied", decision.reason
    out.avg = avg   # every shard decoded into it (an applied round has all of them)
    out.payloads = [s.payload for s in shards]
    # contributors: in every shard (a shard header lists only roster members); the rest are dropped
    out.drop_reasons = drop_reasons(roster, [s.header for s in shards], core.peer_id, ctx.unreachable, decision)
    out.dropped = sorted(out.drop_reasons)
    out.contributors = sorted(set(members) - set(out.dropped))
    out.total_weight = float(sum(members[p].weight for p in out.contributors))
    out.samples = int(sum(members[p].samples for p in out.contributors))
    return out


async def send_and_fetch(core: NetCore, ctx, roster: pb.Roster, delta: torch.Tensor, deadline: Deadline,
                         avg: torch.Tensor) -> tuple[list, list]:
    """The pipelined butterfly of one member. Encodes shard after shard (executor) in send_order;
    to each owner its pieces go one after another (a chain per owner, the chains at once), so
    every owner has the whole of its first piece early, reduces and serves it while the later
    pieces still come in. Each shard's GetShard starts once our part of it is sent (the owner
    holds the call until the shard is reduced) and, from there, once our own pieces up to the
    same piece index have all their parts (own_parts_in); it decodes the result into its slice
    of `avg`. Our chains together measure our upload rate (core.upload_meter: their rates
    summed). Returns the (payload, residual) per shard and the fetch results (a ShardResult or
    the exception) in shard order."""
    codec = get_codec(roster.codec)
    n = len(roster.owners)
    if delta.numel() != roster.numel:
        raise ValueError(f"round {roster.round}: the delta has {delta.numel()} values, the roster {roster.numel}")
    encoded: list = [None] * n
    sends: list = [None] * n
    fetches: list = [None] * n
    b = roster.shard_bounds

    async def send_after(before: tuple[asyncio.Future, asyncio.Event] | None, j: int) -> None:
        if before is not None:   # the previous piece's bytes are all handed to gRPC, or that send ended
            # (its outcome is its own: a failed piece does not stop the next); not its reply: the
            # owner's check of it and a round trip would leave the chain idle
            await set_or_done(before[1], before[0])
        await send_parts(core, ctx, roster, j, encoded[j][0], deadline, written=events[j])

    async def fetch_after_send(j: int) -> ar.ShardResult:
        await sends[j]
        await own_parts_in(ctx, roster, ar.piece_index(roster, j))
        return await fetch_shard(core, ctx, roster, j, encoded[j][0], deadline, avg[b[j]:b[j + 1]])

    loop = asyncio.get_running_loop()
    last: dict[str, tuple[asyncio.Future, asyncio.Event]] = {}   # owner -> our latest send to it
    events = [asyncio.Event() for _ in range(n)]   # set once shard j's part is written
    try:
        for j in send_order(roster, core.peer_id):
            encoded[j] = await loop.run_in_executor(None, ar.encode_shard, delta, roster, codec, core.ef, j)
            owner = roster.owners[j]
            sends[j] = asyncio.ensure_future(send_after(last.get(owner), j))
            last[owner] = (sends[j], events[j])
            fetches[j] = asyncio.ensure_future(fetch_after_send(j))
        await asyncio.gather(*sends)
        # our uplink: the chains ran at once, so their rates add up; a chain slowed by its
        # receiver's downlink lowers only its own part (the total bytes over the slowest chain's
        # time would charge our uplink with the slowest receiver)
        core.upload_meter.observe_rate(sum(sent / (end - began) for sent, began, end in ctx.send_rates.values()
                                           if end > began), ctx.bytes_sent)
        core.faults.hit("after_send", roster.round)
        results = await asyncio.gather(*fetches, return_exceptions=True)
    finally:
        for task in sends + fetches:
            if task is not None and not task.done():
                task.cancel()
    return encoded, list(results)


def send_order(roster: pb.Roster, me: str) -> list[int]:
    """The order a member encodes and starts its sends in: first pieces first (piece index, then
    owner), the owners starting with the one after us, so members do not all begin at the same owner."""
    owners = list(dict.fromkeys(roster.owners))
    first = owners.index(me) + 1 if me in owners else 0
    rank = {o: (i - first) % len(owners) for i, o in enumerate(owners)}
    return sorted(range(len(roster.owners)), key=lambda j: (ar.piece_index(roster, j), rank[roster.owners[j]]))


async def own_parts_in(ctx, roster: pb.Roster, piece: int) -> None:
    """Returns once every shard we own up to piece index `piece` has all its parts in (or is
    reduced without some): the reduce-scatter of a piece comes first on our downlink. Reduced
    shards pulled meanwhile would share it with the parts still coming to us, and the later our
    piece is whole the later its own all-gather starts; on capped links that skew, not the bytes,
    is what made rounds slow (one owner serving its late shard alone while the other links idle)."""
    for j, shard in list(ctx.owned.items()):
        if ar.piece_index(roster, j) <= piece:
            await set_or_done(shard.all_in, shard.result)


async def commit(core: NetCore, roster: pb.Roster, report: pb.CommitRequest, deadline: Deadline
                 ) -> tuple[pb.CommitReply, bool]:
    """Reports to the leader; returns its decision and whether one was heard at all (no
    decision in time means this peer does not apply)."""
    try:
        if roster.leader == core.peer_id:
            return await asyncio.wait_for(group.handle_commit(core, report), deadline.left(0.1)), True
        address = next((m.address for m in roster.members if m.peer_id == roster.leader), "")
        if not address:
            address = next(a for p, a in core.candidates(roster.round, set()) if p == roster.leader)
        return await core.channels.stub(address).Commit(report, timeout=deadline.left(0.1)), True
    except (grpc.aio.AioRpcError, asyncio.TimeoutError, TimeoutError, StopIteration) as e:
        why = describe_rpc_error(e) if isinstance(e, grpc.aio.AioRpcError) else type(e).__name__
        if isinstance(e, grpc.aio.AioRpcError):
            core.suspect(roster.leader, e)
        return pb.CommitReply(apply=False, reason=f"no decision from leader {roster.leader[-6:]}: {why}"), False
