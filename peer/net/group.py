"""Group agreement on the network loop: a round's leader admits joiners (Join), closes the group
with one roster (peer.net.round.LeaderGroup) and answers every member's commit report with one
decision (Commit); a member finds its leader and joins (join_round). Functions of the peer's
NetCore, like the owner's side in owner.py."""

from __future__ import annotations

import asyncio
import logging

import grpc

from peer._proto import peer_pb2 as pb
from peer.config import trusted_owners, wire_codec
from peer.net import validate
from peer.net.client import Reject, describe_rpc_error
from peer.net.core import GROUP_PROBE_TIMEOUT_S, PROBE_TIMEOUT_S, WAKE_S, NetCore
from peer.net.loop import Deadline
from peer.net.round import ClosedElsewhere, LeaderGroup, check_member, roster_hash
from peer.net.verify import OwnerRule

log = logging.getLogger(__name__)


async def handle_join(core: NetCore, req: pb.JoinRequest) -> pb.JoinReply:
    core.check_run(req.run_id, req.spec_hash)
    r = req.round
    if r < core.round:  # we finished round r already: it closed
        return pb.JoinReply(status=pb.JoinReply.CLOSED, current_round=core.round,
                            reason=f"this peer is at round {core.round} already")
    if r > core.round + 1:
        return pb.JoinReply(status=pb.JoinReply.WRONG_ROUND, current_round=core.round)
    best = core.candidates(r, set(req.skip))
    if best and best[0][0] != core.peer_id:
        return pb.JoinReply(status=pb.JoinReply.REDIRECT, redirect_peer_id=best[0][0],
                            redirect_address=best[0][1], current_round=core.round)
    why = check_member(req.member, r) or check_claim(core, req.member, r) or check_suspect(core, req.member, r)
    if why:
        log.warning("round %d: rejected Join of %s: %s", r, req.member.peer_id[-6:], why)
        return pb.JoinReply(status=pb.JoinReply.REJECTED, reason=why, current_round=core.round)
    ctx = core.ctx(r)
    assert ctx is not None
    if ctx.roster.done() and (ctx.group is None or not ctx.group.closed):
        # we are a member of a group another leader closed: a second group would split the round
        return pb.JoinReply(status=pb.JoinReply.CLOSED, current_round=core.round,
                            reason=f"round {r} closed (led by {ctx.roster.result().leader[-6:]})")
    if ctx.group is None:
        ctx.group = LeaderGroup(r, core.peer_id, wire_codec(core.spec), core.numel,
                                owners=OwnerRule.of(core.spec, core.suspects.reducers(r)),
                                sizing=core.spec.shard_sizing)
    group = ctx.group
    if group.closed:
        return pb.JoinReply(status=pb.JoinReply.CLOSED, current_round=core.round, reason="round closed")
    group.add(req.member)
    window = core.join_window_s()
    deadline = Deadline(window + 10)
    while True:
        if core.swarm_round() > r and not group.closed:  # the swarm finished round r without this group
            group.fail(ClosedElsewhere(f"the swarm at round {core.swarm_round()}"))
            break  # (checked first: the members who moved on are no longer expected, a group of us alone is)
        if group.maybe_close(core.expected_members(r), window):
            break
        missing = group.window_over(core.expected_members(r), window)
        if missing and not group.probed and not group.probing:
            group.probing = True
            try:
                other = await group_elsewhere(core, r, missing)
            finally:
                group.probe_done()
            if other and not group.closed:
                log.info("round %d: %s are in a group led by %s; closing ours without forming it",
                         r, ", ".join(p[-6:] for p in sorted(missing)), other[-6:])
                group.fail(ClosedElsewhere(f"its group is led by {other[-6:]}"))
        if deadline.expired():
            raise TimeoutError(f"round {r}: group did not close")
        best = core.candidates(r, set(req.skip))
        if best and best[0][0] != core.peer_id:  # our view now knows a better leader: hand over
            group.members.pop(req.member.peer_id, None)
            return pb.JoinReply(status=pb.JoinReply.REDIRECT, redirect_peer_id=best[0][0],
                                redirect_address=best[0][1], current_round=core.round)
        # woken by a join, the close or a probe's end; the view and the window are rechecked at
        # least every WAKE_S (a refreshed view may change who is expected)
        until_window = group.close_in(window)   # past it, only a probe's end or a view changes things
        await group.changed(min(WAKE_S, until_window if until_window > 0 else WAKE_S, deadline.left()))
    try:
        roster = await group.roster
    except ClosedElsewhere as e:
        return pb.JoinReply(status=pb.JoinReply.CLOSED, current_round=core.round,
                            reason=f"round {r} closed elsewhere ({e})")
    except RuntimeError as e:   # LeaderGroup.maybe_close failed it: no serving or no trusted owner joined
        return pb.JoinReply(status=pb.JoinReply.CLOSED, current_round=core.round,
                            reason=f"round {r} closed without a roster ({e})")
    if req.member.peer_id not in {m.peer_id for m in roster.members}:
        return pb.JoinReply(status=pb.JoinReply.CLOSED, current_round=core.round, reason="round closed")
    return pb.JoinReply(status=pb.JoinReply.OK, roster=roster)


def check_claim(core: NetCore, m: pb.Member, r: int) -> str:
    """Why a joiner's claimed work is not backed by what it published (validate.join_claim)."""
    if m.peer_id == core.peer_id:
        return ""
    record = core.view.get(m.peer_id)
    ctx = core.rounds.get(r)
    tally = ctx.tally if ctx is not None else None
    return validate.join_claim(m, r, record if record is not None and record.fresh() else None,
                               tally.reports.get(m.peer_id) if tally else None,
                               tally.allowed.get(m.peer_id) if tally else None, core.spec.weighting)


def check_suspect(core: NetCore, m: pb.Member, r: int) -> str:
    """Why a joiner is kept out of round r ("" when it is not): it sent the two reducers of a shard
    different parts in a recent round (--verify-shards; peer.net.verify)."""
    if m.peer_id in core.suspects.contributors(r):
        return (f"it sent the two reducers of a shard different parts; kept out until round "
                f"{core.suspects.until[m.peer_id]}")
    return ""


async def join_round(core: NetCore, r: int, member: pb.Member, deadline: Deadline) -> pb.Roster | None:
    """Asks the round's leader to admit us; None when the round closed without us."""
    skip: set[str] = set()
    redirect: tuple[str, str] | None = None
    while not deadline.expired():
        ahead = core.swarm_round()
        if ahead > r:  # a peer finished round r already: joining now would split the swarm
            log.info("round %d: the swarm is at round %d already; catching up", r, ahead)
            return None
        cands = core.candidates(r, skip)
        target = redirect or (cands[0] if cands else None)
        redirect = None
        if target is None:
            await asyncio.sleep(0.2)
            continue
        req = pb.JoinRequest(run_id=core.run_id, round=r, spec_hash=core.spec_hash, member=member,
                             skip=sorted(skip))
        try:
            if target[0] == core.peer_id:
                reply = await handle_join(core, req)
            else:  # a short probe first: a stopped leader costs seconds, not the join window
                await core.channels.stub(target[1]).Health(pb.HealthRequest(), timeout=PROBE_TIMEOUT_S)
                reply = await core.channels.stub(target[1]).Join(
                    req, timeout=min(deadline.left(0.1), core.join_window_s() + 15))
        except grpc.aio.AioRpcError as e:
            log.warning("round %d: leader %s at %s did not answer Join (%s); passing it over",
                        r, target[0][-6:], target[1], describe_rpc_error(e))
            core.suspect(target[0], e)
            skip.add(target[0])
            continue
        if reply.status == pb.JoinReply.OK:
            roster = reply.roster
            why = ("its hash is not its content's" if roster.hash != roster_hash(roster) or roster.round != r
                   else validate.roster(roster, core.numel, wire_codec(core.spec), core.peer_id,
                                        trusted_owners(core.spec)))
            if not why:
                return roster
            log.warning("round %d: leader %s sent a roster we cannot use (%s); passing it over", r,
                        target[0][-6:], why)
            skip.add(target[0])
            continue
        if reply.status == pb.JoinReply.REDIRECT and reply.redirect_peer_id not in skip:
            redirect = (reply.redirect_peer_id, reply.redirect_address)
        elif reply.status == pb.JoinReply.CLOSED or reply.current_round > r:
            log.info("round %d: leader %s says the round closed without us (%s)", r, target[0][-6:],
                     reply.reason or f"it is at round {reply.current_round}")
            return None
        elif reply.status == pb.JoinReply.REJECTED:
            raise RuntimeError(f"round {r}: leader {target[0][-6:]} rejected us: {reply.reason}")
        else:
            await asyncio.sleep(0.2)
    raise TimeoutError(f"round {r}: no leader admitted us before the deadline")


async def handle_commit(core: NetCore, req: pb.CommitRequest) -> pb.CommitReply:
    ctx = core.ctx(req.round)
    if ctx is None or ctx.group is None or not ctx.group.closed or ctx.group.roster.exception() is not None:
        raise Reject(grpc.StatusCode.FAILED_PRECONDITION, f"round {req.round}: this peer leads no group")
    group = ctx.group
    if group.roster.result().hash != req.roster_hash:
        raise Reject(grpc.StatusCode.FAILED_PRECONDITION, f"round {req.round}: unknown roster")
    if req.peer_id not in {m.peer_id for m in group.roster.result().members}:
        raise Reject(grpc.StatusCode.PERMISSION_DENIED, f"round {req.round}: {req.peer_id[-6:]} is not a member")
    group.add_report(req)
    core.faults.hit("leader_commit", req.round)
    deadline = Deadline(core.transfer_timeout_s() + 10)
    while not group.maybe_decide(core.transfer_timeout_s()):
        if deadline.expired():
            raise TimeoutError(f"round {req.round}: no commit decision")
        await group.changed(min(group.decide_in(core.transfer_timeout_s()), deadline.left()))
    return await group.decision


async def group_elsewhere(core: NetCore, r: int, missing: set[str]) -> str:
    """The leader of another group of round `r` that some of `missing` belong to, or ""."""
    addrs = [rec.addr for p, rec in core.view.items() if p in missing and rec.addr][:3]

    async def ask(addr: str) -> str:
        try:
            h = await core.channels.stub(addr).Health(pb.HealthRequest(), timeout=GROUP_PROBE_TIMEOUT_S)
        except grpc.aio.AioRpcError:
            return ""
        if h.round > r:  # it finished round r already
            return h.peer_id
        return h.group_leader if h.round == r and h.group_leader not in ("", core.peer_id) else ""

    found = [x for x in await asyncio.gather(*(ask(a) for a in addrs)) if x]
    return found[0] if found else ""
