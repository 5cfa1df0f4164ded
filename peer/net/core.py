"""The peer's network state and the round protocol's leader side, all on the network loop:
progress in the DHT and the view of the swarm, readiness, the round-start barrier, the
trigger (Progress leases), the Progress / GetState / GetUpdates handlers (Join and Commit are
group.py, the owner side owner.py, a member's round member.py with scatter.py and gather.py, the
next state keeper.py). Never blocks: big tensor work goes to an executor."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import grpc
import hivemind
from hivemind.utils import get_dht_time

from peer import tlsfiles
from peer._proto import peer_pb2 as pb
from peer.codecs import get_codec
from peer.config import PeerConfig, RunSpec, wire_codec
from peer.faults import FaultPlan
from peer.feedback import ErrorFeedback
from peer.identity import Identity
from peer.net import allreduce as ar
from peer.net import swarm
from peer.net.auth import Verifier
from peer.net.client import Channels, Reject, describe_rpc_error
from peer.net.deadlines import Deadlines
from peer.net.limits import CallerLimits
from peer.net.loop import Deadline
from peer.net.reach import DialBackService, Reachability
from peer.net.replay import KEEP_ROUNDS, UpdateLog
from peer.net.round import LeaderGroup, Tally, leader_rank
from peer.net.signer import Signer
from peer.net.state_sync import HeldStates, StateSnapshot
from peer.net.upload import RateMeter, UploadCap, cap_bps, upload_estimate
from peer.net.verify import Suspects

log = logging.getLogger(__name__)
REFRESH_S = 0.5
PROBE_TIMEOUT_S = 3.0   # a leader that does not answer Health within this is passed over
GROUP_PROBE_TIMEOUT_S = 2.0  # a missing member that does not say within this is in no other group
SPEC_REFRESH_S = 10.0   # every peer re-publishes the run spec, so it outlives the peer that started it
PROGRESS_S = 0.1        # a training member reports its progress to the round's leader this often
WAKE_S = 0.25           # a Join waiting on its group rechecks the DHT view at least this often
GRANT_FRESH_S = 1.5     # a leader's answer older than this is not trusted: the DHT view decides


@dataclass
class RoundCtx:
    """Everything this peer holds for one round, whatever its role in it."""

    round: int
    roster: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    group: LeaderGroup | None = None
    owned: dict[int, ar.OwnedShard] = field(default_factory=dict)
    fetched: dict[int, tuple[pb.ShardHeader, bytes]] = field(default_factory=dict)  # results we pulled
    backups: dict[int, ar.OwnedShard] = field(default_factory=dict)  # dead owners' shards reduced here
    unreachable: set[str] = field(default_factory=set)  # owners we could not send to or pull from
    tally: Tally | None = None   # as the round's leader: the members' progress reports
    bytes_sent: int = 0
    bytes_received: int = 0
    # owner -> (bytes, first start, last end) of our parts to it (a chain of pieces: member.send_and_fetch)
    send_rates: dict[str, tuple[int, float, float]] = field(default_factory=dict)
    accepted: set[tuple[int, bool]] = field(default_factory=set)   # (shard, to its backup) that took our part


class NetCore:
    def __init__(self, dht: hivemind.DHT, cfg: PeerConfig, identity: Identity):
        self.dht, self.cfg, self.identity = dht, cfg, identity
        self.peer_id = identity.peer_id
        self.run_id = cfg.run_id
        self.address = ""
        self.dht_address = ""                # host:port of our DHT node (TCP), dialled back with `address`
        self.client_mode = cfg.client_mode   # no inbound connections: set by --client-mode, or when a dial-back
        #                                      check finds us unreachable (reach.py); the loop replaces it only
        self.reach = Reachability()
        # TLS (--tls-*): every channel and the server; it protects every byte, so chunks carry no MAC
        self.tls = tlsfiles.load(cfg.tls_cert, cfg.tls_key, cfg.tls_ca) if cfg.tls_ca else None
        self.signer = Signer(identity, cfg.run_secret, seal=self.tls is None)   # signs every call we make
        self.verifier = Verifier(cfg.run_secret, cfg.max_clock_skew_s, seal=self.tls is None)   # checks every call
        self.limits = CallerLimits()   # per caller host and peer: calls/s and calls at once (limits.py)
        self.dialer = DialBackService(self.signer, self.tls)
        self.spec: RunSpec | None = None
        self.spec_hash = ""
        self.numel = 0
        self.channels = Channels(self.signer, self.tls)
        self.round = -1                      # the round this peer trains for; -1 before it has state
        self.steps = self.samples = 0
        self.rate = 0.0
        self.training = False
        self.view: dict[str, swarm.PeerRecord] = {}
        self.others = (time.monotonic(), 0.0, 0.0)   # (when, their steps, their steps/s)
        self.rounds: dict[int, RoundCtx] = {}
        self.held = HeldStates(KEEP_ROUNDS)  # the states GetState serves: this round's and older pinned ones
        self.ef, self.owner_ef = ErrorFeedback(), ErrorFeedback()
        self.last_refresh_error = ""
        self.viewed_at = 0.0   # when the view was last read from the DHT
        self.updates = UpdateLog()
        self.faults = FaultPlan.from_env()
        self.deadlines = Deadlines(cfg.timeout_floor_s, cfg.timeout_ceiling_s, cap_bps(cfg.max_upload_mbit))
        self.upload = UploadCap(cap_bps(cfg.max_upload_mbit))  # every outgoing shard and state stream
        self.upload_meter = RateMeter()      # a round's sends to all owners at once (member.run_round)
        self.spec_record: dict | None = None  # the adopted spec proposal, re-published by every peer
        self.spec_published_at = 0.0
        self.step_s: dict[str, float] = {}   # inner step seconds of the peers seen training
        self.phase = swarm.SYNC              # what we do now, published in our record
        self.grant: tuple[int, int, bool, float] | None = None  # leader's answer: (round, allowed, close, when)
        self.round_started = 0.0             # monotonic time training of self.round began
        self.round_clock = swarm.RoundClock()  # how often the swarm closes a round (the keeper's catch-up)
        self._viewed = asyncio.Event()       # set (and replaced) after every view refresh
        self._progress_task: asyncio.Task | None = None
        self.gone: dict[str, float] = {}     # peers whose process is gone (refused us): until when to skip them
        # the round and the serving members (peer id -> address) of the last roster we were in: leader
        # candidates of the next round even when the DHT lost their records (candidates)
        self.last_group: tuple[int, dict[str, str]] = (-1, {})
        self.suspects = Suspects()           # peers a --verify-shards mismatch pointed at (verify.py)

    # ---- progress, view and trigger -------------------------------------------------------
    def record(self) -> swarm.PeerRecord:
        state_round = self.snapshot.header.round if self.snapshot else -1
        lie = self.faults.claim_factor(self.round)   # 1 unless a test makes this peer forge its progress
        return swarm.PeerRecord(self.peer_id, "" if self.client_mode else self.address, self.round,
                                int(self.steps * lie), int(self.samples * lie), self.rate if self.training else 0.0,
                                self.training,
                                self.client_mode, state_round, self.spec_hash, get_dht_time(), self.phase,
                                self.upload_bps())

    def upload_bps(self) -> float:
        """The upload rate we announce (record and Join): measured, at most --max-upload-mbit."""
        return upload_estimate(self.upload_meter, self.upload.rate_bps)

    async def publish(self) -> None:
        await swarm.store(self.dht, swarm.peers_key(self.run_id), self.record().to_value(), 5.0)

    async def refresh(self) -> None:
        """Publishes our record and reads the others'; a slow store does not keep us from reading."""
        if self.spec is not None:
            try:
                await self.publish()
            except TimeoutError as e:
                log.debug("publishing our progress: %s", e)
        if self.spec_record is not None and time.monotonic() - self.spec_published_at > SPEC_REFRESH_S:
            await swarm.store(self.dht, swarm.spec_key(self.run_id), self.spec_record, 5.0)
            self.spec_published_at = time.monotonic()
        view = await swarm.read_peers(self.dht, self.run_id, 5.0)
        seen = {p: 1.0 / r.rate for p, r in view.items() if r.rate > 0}  # shown only while training

        merged = {p: r for p, r in self.view.items() if r.fresh()}  # a read may miss a record: keep the last
        for p, r in view.items():
            if p != self.peer_id and r.spec == self.spec_hash and (p not in merged or r.t >= merged[p].t):
                merged[p] = r
        self.view = merged
        self.viewed_at = time.monotonic()
        # replaced, never changed in place: the trainer thread reads it
        self.step_s = {p: t for p, t in {**self.step_s, **seen}.items() if p in merged}
        mine = [r for r in self.view.values() if r.fresh() and r.round == self.round and r.phase == swarm.TRAIN]
        self.others = (time.monotonic(), sum(r.steps_now() for r in mine), sum(r.rate for r in mine))
        self.round_clock.mark(max([r.round for r in self.live_peers() if r.ready()] + [self.round]))
        log.debug("view: %d peers, %d in round %d with %.0f steps at %.1f steps/s", len(self.view), len(mine),
                  self.round, self.others[1], self.others[2])
        self._viewed.set()
        self._viewed = asyncio.Event()

    async def next_view(self, timeout_s: float) -> None:
        """Waits for the next view refresh (at most timeout_s)."""
        try:
            await asyncio.wait_for(self._viewed.wait(), max(timeout_s, 0.0))
        except asyncio.TimeoutError:
            pass

    async def refresh_forever(self) -> None:
        while True:
            try:
                await self.refresh()
                self.last_refresh_error = ""
            except TimeoutError as e:  # the DHT may be slow; keep the last view and say so once
                if str(e) != self.last_refresh_error:
                    log.warning("DHT refresh failed: %s; keeping the last view of %d peers", e, len(self.view))
                self.last_refresh_error = str(e)
            except Exception:  # a bug, not a slow DHT: say so with the traceback, and keep refreshing
                log.exception("refreshing the view of the swarm failed")
            self.gc_rounds()
            await asyncio.sleep(REFRESH_S)

    def swarm_round(self) -> int:
        """The highest round a live peer trains for or holds the state of (-1 when none is known):
        a peer that applied round r holds r+1 before it starts training it."""
        return max((max(r.round, r.state_round) for r in self.live_peers() if r.addr or r.client), default=-1)

    def live_peers(self, round_: int | None = None) -> list[swarm.PeerRecord]:
        now, gone = time.monotonic(), self.gone
        return [r for r in self.view.values()
                if r.fresh() and (round_ is None or r.round == round_) and gone.get(r.peer_id, 0.0) < now]

    def suspect(self, peer_id: str, e: grpc.aio.AioRpcError) -> None:
        """A peer that refused a connection (its process is gone) is no live peer until its record
        would go stale anyway: no leader, member or donor to wait for. Also read by the trainer
        thread: the dict is replaced, never changed."""
        if e.code() == grpc.StatusCode.UNAVAILABLE and peer_id != self.peer_id:
            now = time.monotonic()
            self.gone = {p: t for p, t in self.gone.items() if t > now} | {peer_id: now + swarm.FRESH_S}

    def ready_peers(self) -> list[swarm.PeerRecord]:
        """Live peers holding a state of the run, not catching up: the ones that count."""
        return [r for r in self.live_peers() if r.ready()]

    def gc_rounds(self) -> None:
        for r in [r for r in self.rounds if r < self.round - 2]:
            del self.rounds[r]

    def ctx(self, round_: int) -> RoundCtx | None:
        """The round's context; created only for the rounds this peer can take part in now."""
        if round_ not in self.rounds:
            if not self.round - 1 <= round_ <= self.round + 1:
                return None
            self.rounds[round_] = RoundCtx(round_)
        return self.rounds[round_]

    # ---- a round's training: start barrier, progress to the leader ------------------------
    async def begin_round(self, round_: int) -> float:
        """Starts training for `round_` once the peers still finishing the round before (or
        still deciding whether to train this one again) have moved on, at most a join window:
        a peer that started early would fill the round's target alone and leave the others no
        step to contribute. Until the swarm has dialled our address back once (reach.py), asks
        it first (a few seconds). Returns when training began."""
        await self.reach.settle(self)
        self.round, self.steps, self.samples, self.training, self.grant = round_, 0, 0, False, None
        self.phase = swarm.WAIT
        await self._publish_quietly()
        deadline = Deadline(self.join_window_s())
        behind: list[swarm.PeerRecord] = []
        while not deadline.expired():
            behind = [r for r in self.live_peers() if (r.addr or r.client)
                      and (r.round == round_ - 1 or (r.round == round_ and r.phase == swarm.SYNC))]
            if not behind:
                break
            await self.next_view(min(deadline.left(), 1.0))
        if behind:
            log.info("round %d: starting although %s still finish round %d", round_,
                     ", ".join(r.peer_id[-6:] for r in behind), round_ - 1)
        self.training, self.phase, self.others = True, swarm.TRAIN, (time.monotonic(), 0.0, 0.0)
        self.round_started = time.monotonic()
        await self._publish_quietly()
        self._progress_task = asyncio.ensure_future(self.progress_forever(round_))
        return self.round_started

    def end_training(self) -> None:
        """The trainer stopped training this round: no more progress reports."""
        self.training = False
        if self._progress_task is not None:
            self._progress_task.cancel()
            self._progress_task = None

    async def _publish_quietly(self) -> None:
        try:
            await self.publish()
        except TimeoutError as e:
            log.debug("publishing our progress: %s", e)

    def set_progress(self, steps: int, samples: int, steps_per_s: float) -> None:
        self.steps, self.samples, self.rate = steps, samples, steps_per_s

    async def progress_forever(self, round_: int) -> None:
        """While we train `round_`: report our steps to its leader and keep its answer (the
        trainer stops at the steps it allows); without an answer the DHT view decides."""
        while self.training and self.round == round_:
            await self.report_progress(round_)
            await asyncio.sleep(PROGRESS_S)

    async def report_progress(self, round_: int) -> tuple[int, int, bool, float] | None:
        """One Progress report to the round's leader; keeps and returns its answer (None: no leader answered)."""
        cands = self.candidates(round_, set())
        req = pb.ProgressRequest(run_id=self.run_id, spec_hash=self.spec_hash, round=round_,
                                 peer_id=self.peer_id, steps=self.steps, rate=self.rate)
        try:
            if not cands:
                return None
            if cands[0][0] == self.peer_id:
                reply = self.handle_progress(req)
            else:
                reply = await self.channels.stub(cands[0][1]).Progress(req, timeout=PROBE_TIMEOUT_S)
        except grpc.aio.AioRpcError as e:
            log.debug("round %d: progress to %s: %s", round_, cands[0][0][-6:], describe_rpc_error(e))
            self.suspect(cands[0][0], e)
            return None
        if not reply.leader or self.round != round_:
            return None
        self.grant = (round_, reply.allowed_steps, reply.close, time.monotonic())
        return self.grant

    async def ask_for_steps(self, round_: int, steps: int) -> tuple[int, int, bool, float] | None:
        """The trainer used up what the leader allowed: report `steps` now for a fresh answer."""
        self.steps = steps
        return await self.report_progress(round_)

    def handle_progress(self, req: pb.ProgressRequest) -> pb.ProgressReply:
        self.check_run(req.run_id, req.spec_hash)
        r = req.round
        cands = self.candidates(r, set())
        ctx = self.ctx(r)
        if ctx is None or not cands or cands[0][0] != self.peer_id or self.spec is None:
            return pb.ProgressReply(leader=False, current_round=self.round)
        if ctx.tally is None:
            ctx.tally = Tally(self.spec.target_steps)
        if r == self.round and self.training:  # our own steps count without a report over the wire
            ctx.tally.reports[self.peer_id] = (self.steps, self.rate, time.monotonic())
        # peers not heard from yet but about to train r (in its barrier, or finishing r-1) keep
        # a share: a member that starts first must not take the whole round
        unseen = [p for p in self.live_peers() if p.ready() and r - 1 <= p.round <= r
                  and p.peer_id not in ctx.tally.reports and p.peer_id != req.peer_id]
        training = [p for p in unseen if p.round == r and p.phase == swarm.TRAIN]
        rates = [p.rate if p in training else 1.0 / self.step_s[p.peer_id] for p in unseen
                 if p in training or self.step_s.get(p.peer_id, 0) > 0]
        allowed, close, total = ctx.tally.report(req.peer_id, req.steps, req.rate, time.monotonic(),
                                                 [p.steps_now() for p in training], sum(rates))
        return pb.ProgressReply(leader=True, allowed_steps=allowed, close=close, total_steps=total,
                                current_round=self.round)

    # ---- group agreement -----------------------------------------------------------------
    def candidates(self, round_: int, skip: set[str]) -> list[tuple[str, str]]:
        """Leader candidates for `round_` (peer id, address), best first: fresh serving peers
        in this round or just finishing the one before; and the serving members of our group of
        the round before whose records we do not see (a DHT that is slow to store or to answer
        must not make two peers that just averaged together each lead a group of its own: two
        states of one round). A member that is gone costs one Health probe (join_round)."""
        found = {r.peer_id: r.addr for r in self.live_peers()
                 if round_ - 1 <= r.round <= round_ and not r.client and r.addr}
        found |= self.unseen_last_group(round_)
        if not self.client_mode and round_ - 1 <= self.round <= round_:
            found[self.peer_id] = self.address
        ranked = sorted(found, key=lambda p: leader_rank(self.run_id, round_, p))
        return [(p, found[p]) for p in ranked if p not in skip]

    def expected_members(self, round_: int) -> set[str]:
        """Whom a leader of `round_` waits for: ready live peers in it, and us. Not the last group's
        members we do not see (candidates): a leader admits only joiners whose record it sees."""
        out = {r.peer_id for r in self.live_peers(round_) if r.ready()}
        if self.round == round_:
            out.add(self.peer_id)
        return out

    def unseen_last_group(self, round_: int) -> dict[str, str]:
        """The serving members (peer id -> address) of our group of round `round_` - 1 with no fresh
        record in the view and not known gone."""
        last_round, last = self.last_group
        if last_round != round_ - 1:
            return {}
        now, seen = time.monotonic(), {r.peer_id for r in self.view.values() if r.fresh()}
        return {p: a for p, a in last.items() if p != self.peer_id and p not in seen and self.gone.get(p, 0.0) < now}

    def check_run(self, run_id: str, spec_hash: str) -> None:
        if run_id != self.run_id or spec_hash != self.spec_hash:
            raise Reject(grpc.StatusCode.FAILED_PRECONDITION,
                         f"this peer is in run {self.run_id} spec {self.spec_hash}, not {run_id} {spec_hash}")

    # ---- state, updates, health: Join and Commit are group.py, the shards' owner side owner.py ----
    @property
    def snapshot(self) -> StateSnapshot | None:
        """The state this peer serves now (HeldStates keeps the older ones downloads still use)."""
        return self.held.current

    @snapshot.setter
    def snapshot(self, snap: StateSnapshot | None) -> None:
        self.held.current = snap

    async def handle_get_updates(self, req: pb.UpdatesRequest) -> list[pb.UpdateChunk]:
        chunks = self.updates.chunks(req.from_round, req.to_round)
        if chunks is None:
            raise Reject(grpc.StatusCode.FAILED_PRECONDITION,
                         f"updates {req.from_round}..{req.to_round - 1} wanted, this peer keeps {self.updates.span()}")
        return self.signer.macs.seal_updates(chunks, self.peer_id)

    def health(self) -> pb.HealthReply:
        ctx = self.rounds.get(self.round)
        leader = ctx.roster.result().leader if ctx is not None and ctx.roster.done() else ""
        return pb.HealthReply(peer_id=self.peer_id, run_id=self.run_id, round=self.round, spec_hash=self.spec_hash,
                              group_leader=leader, time=get_dht_time())

    def join_window_s(self) -> float:
        """The join window in force, from the slowest inner step of the live peers and ours.
        Also called from the trainer thread: it reads values the loop replaces (step_s, view), and
        the only thing it writes is which window Deadlines last logged."""
        live = {r.peer_id for r in self.live_peers()}
        own = [1.0 / self.rate] if self.rate > 0 else []
        slowest = max([s for p, s in self.step_s.items() if p in live] + own, default=0.0)
        return self.deadlines.join_window_s(slowest, self.cfg.join_window_s)

    def transfer_timeout_s(self) -> float:
        """Seconds any one transfer of a round may take, from the measured rate (see deadlines.py)."""
        codec = get_codec(wire_codec(self.spec)) if self.spec else None
        return self.deadlines.transfer_s(codec.encoded_size(self.numel) if codec else 4 * self.numel)
