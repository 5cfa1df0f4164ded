"""A member's whole round on the network loop: join the group, send every shard to its owner,
pull every reduced shard, report the hashes to the leader and end with one Outcome."""

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
from peer.net import group, swarm, validate, verify
from peer.net import owner as owner_side
from peer.net.chunkmac import MacError
from peer.net.client import EndedEarly, describe_rpc_error, sent
from peer.net.core import NetCore
from peer.net.loop import Deadline, set_or_done
from peer.net.round import Outcome, drop_reasons
from peer.net.upload import MIN_SAMPLE_BYTES, paced

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
    owner_side.own_shards(core, ctx, roster)
    core.faults.hit("after_join", r)
    avg = torch.empty(roster.numel, dtype=torch.float32)   # each reduced shard is decoded into its slice
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
