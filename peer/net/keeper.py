"""The global state on the network side, and the one place that decides what it becomes: the
state a peer starts from, the state after each round (applied, aborted by everyone, or taken
from the swarm), the digest check and a reload. Runs on the network loop; tensor work goes to
an executor. A state's round number advances only with an applied update or an abort the
round's members agreed on: a peer that cannot get the next state keeps the one it has."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from dataclasses import dataclass

import torch

from peer.codecs import get_codec
from peer.config import wire_codec
from peer.net import allreduce as ar
from peer.net import digests, restart, swarm
from peer.net.core import NetCore
from peer.net.loop import Deadline
from peer.net.member import run_round
from peer.net.replay import KEEP_ROUNDS, replay
from peer.net.round import Outcome
from peer.net.state_sync import Received, StateSnapshot, download
from peer.outer import GlobalState, outer_step

log = logging.getLogger(__name__)
STATE_TIMEOUT_S = 120.0   # the most one attempt waits for a newer state
UNDECIDED_WAIT_S = 8.0    # no decision heard: how long to wait for a member that applied ...
UNDECIDED_GRACE_S = 3.0   # ... and when none is seen to hold or work on one, how soon to give up
BACKOFF_S = (2.0, 30.0)   # retrying to get a newer state: first and longest pause
MISSED_BEFORE_VERDICT = 3  # rounds missed in a row before we judge whether our link keeps up


class NobodyAhead(Exception):
    """No live peer holds, or works on, the state wanted: none will come."""


class CannotKeepUp(RuntimeError):
    """This peer's link cannot carry one round's update within a round: it would chase forever."""


class AheadWatch:
    """Ends a wait for a state of round >= min_round once, for `grace_s`, no live peer (but
    those in `ignore`, known dead) holds one or trains or averages the round before it."""

    def __init__(self, min_round: int, ignore: frozenset[str] = frozenset(), grace_s: float = swarm.FRESH_S):
        self.min_round, self.ignore, self.grace_s = min_round, ignore, grace_s
        self.since = time.monotonic()

    def check(self, live: list[swarm.PeerRecord]) -> None:
        working = (swarm.TRAIN, swarm.AVERAGE)
        if any(max(r.round, r.state_round) >= self.min_round
               or (r.round == self.min_round - 1 and r.phase in working) for r in live if r.peer_id not in self.ignore):
            self.since = time.monotonic()
        elif time.monotonic() - self.since > self.grace_s:
            raise NobodyAhead(f"no live peer is at round {self.min_round} or working on round {self.min_round - 1}")


@dataclass(frozen=True)
class RoundResult:
    """What the trainer gets back for a round: the state to train from next (never changed
    in place by anyone) and what happened."""

    state: GlobalState
    outcome: Outcome
    divergences: int   # reloads after a digest check, since the start


class Keeper:
    def __init__(self, core: NetCore, genesis: bool):
        self.core, self.genesis = core, genesis
        self.state: GlobalState | None = None
        self.divergences = 0
        self.missed = 0              # rounds in a row we did not contribute to
        self.failures = 0            # attempts in a row that did not get a newer state
        self.fetch_rate_bps: float | None = None   # how fast states and updates reach us
        self.failed_downloads = 0    # downloads that did not end with a state (its donors moved on, ...)
        # states got from the swarm by "download" or "replay", failed attempts, bytes received (/metrics)
        self.fetched: Counter[str] = Counter()
        self.fetch_failures: Counter[str] = Counter()
        self.fetched_bytes: Counter[str] = Counter()
        self._scratch: torch.Tensor | None = None   # outer_step's intermediate, recycled: nothing else sees it

    # ---- holding a state ------------------------------------------------------------------
    async def adopt(self, state: GlobalState) -> None:
        """Makes `state` ours and serves it (the snapshot is built in an executor)."""
        snap = await asyncio.get_running_loop().run_in_executor(None, StateSnapshot.of, state, self.core.spec_hash)
        self.state = state
        self.core.held.put(snap)
        self.core.phase = swarm.WAIT

    def commit(self, r: int, new: GlobalState, outcome: Outcome) -> None:
        """Round r's update, with the error-feedback residuals it settles: one synchronous step
        on the loop, so a checkpoint never holds residuals of a round its state lacks."""
        assert outcome.roster is not None
        codec = get_codec(outcome.roster.codec)
        applied = outcome.kind == "applied"
        if applied:
            ar.apply_residuals(self.core.ef, codec, outcome.residuals)
            ar.apply_residuals(self.core.owner_ef, codec, outcome.owner_residuals)
        self.state = new
        self.core.updates.add(r, applied, codec.name, list(outcome.roster.shard_bounds),
                              outcome.payloads if applied else [], outcome.samples if applied else 0, new.digest())

    def checkpoint_parts(self) -> tuple[GlobalState | None, dict, dict]:
        """The state and the residuals that go with it, taken together."""
        return self.state, self.core.ef.state_dict(), self.core.owner_ef.state_dict()

    # ---- the first state --------------------------------------------------------------------
    async def start(self, ckpt: GlobalState | None, fresh: GlobalState) -> GlobalState:
        """From our checkpoint or from the swarm, whichever is newer; a new run starts from `fresh`."""
        await self._view()
        donors = [r.state_round for r in self.core.live_peers() if r.addr and r.state_round >= 0]
        if ckpt is not None and ckpt.round > max(donors, default=-1):
            if donors:
                log.info("resuming from our checkpoint of round %d (the swarm has round %d)", ckpt.round, max(donors))
                state = ckpt
            else:
                state = await self.agreed_restart(ckpt)
        elif self.genesis and not donors:
            log.info("created the initial state (digest %s)", fresh.digest()[:12])
            state = fresh
        else:
            log.info("downloading the global state from the swarm")
            try:
                state = await self.download(0, Deadline(STATE_TIMEOUT_S))
            except (TimeoutError, NobodyAhead) as e:
                raise RuntimeError(f"could not get the run's state from any live peer: {e}") from None
        await self.adopt(state)
        return state

    async def agreed_restart(self, mine: GlobalState) -> GlobalState:
        """Nobody holds the run's state (a full stop): the restarting peers agree on the newest
        checkpoint, the one most of them hold for that round; ours, or we download it."""
        wait_s = max(10.0, 3 * self.core.join_window_s())
        want = self.core.spec.min_peers if self.core.spec else 1
        r, digest, count, of = await restart.agree(self.core, (mine.round, mine.digest()), want, Deadline(wait_s))
        if (r, digest) == (mine.round, mine.digest()):
            log.info("resuming from our checkpoint of round %d (digest %s, held by %d of %d restarting peers "
                     "at that round)", r, digest[:12], count, of)
            return mine
        log.warning("our checkpoint (round %d, digest %s) is not the one the restarting peers agree on "
                    "(round %d, digest %s, %d of %d at that round); downloading that state", mine.round,
                    mine.digest()[:12], r, digest[:12], count, of)
        try:
            return await self.download(r, Deadline(STATE_TIMEOUT_S), digest)
        except (TimeoutError, NobodyAhead) as e:
            raise RuntimeError(f"could not get the agreed state of round {r} from any live peer: {e}") from None

    # ---- a round ------------------------------------------------------------------------------
    async def finish_round(self, r: int, delta: torch.Tensor, weight: float, samples: int,
                           carried: tuple[float, int], limit_s: float) -> RoundResult:
        """Averages `delta` with the round's group (unless no inner step fit: weight 0) and
        decides the next state. Raises CannotKeepUp when our link is too slow for the run."""
        state = self.state
        assert state is not None and state.round == r, "the trainer's round is the keeper's"
        self.core.end_training()
        if weight <= 0:
            outcome = Outcome("excluded", reason="no inner step fit in the round")
        else:
            self.core.phase = swarm.AVERAGE
            try:
                outcome = await asyncio.wait_for(run_round(self.core, r, delta, weight, samples, carried), limit_s)
            except asyncio.TimeoutError:
                outcome = Outcome("aborted", reason=f"the round did not end within {limit_s:.0f} s")
        new = await self.next_state(state, outcome)
        if new.round != state.round:
            await digests.publish(self.core, new)
            new = await self.check_digest(new, outcome)
        self.track(outcome)
        self.core.phase = swarm.WAIT
        return RoundResult(new, outcome, self.divergences)

    async def next_state(self, state: GlobalState, outcome: Outcome) -> GlobalState:
        r = state.round
        if outcome.kind == "applied":
            assert outcome.avg is not None and self.core.spec is not None
            if self._scratch is None or self._scratch.numel() != state.theta.numel():
                self._scratch = torch.empty_like(state.theta)
            theta, momentum = await asyncio.get_running_loop().run_in_executor(
                None, outer_step, state.theta, state.momentum, outcome.avg, self.core.spec.outer_lr,
                self.core.spec.outer_momentum, self._scratch)
            new = GlobalState(theta, momentum, r + 1, state.global_samples + outcome.samples)
            await asyncio.get_running_loop().run_in_executor(None, new.digest)   # hashed off the loop, once
            self.commit(r, new, outcome)
            await self.adopt(new)
            return new
        if outcome.kind == "aborted" and outcome.decided:
            # the leader's abort: nobody applied, but a member that gave up waiting for it may train
            # round r again and apply it, so the round number stays: only an applied update moves it
            outcome.reason += f"; kept the state of round {r} to train it again"
            log.warning("round %d: %s: %s", r, outcome.kind, outcome.reason)
            self.core.rounds.pop(r, None)   # a new attempt at round r gets a new group
            return state
        log.warning("round %d: %s: %s", r, outcome.kind, outcome.reason)
        # excluded: the others finish the round, take their state; no decision heard (the
        # leader died): nobody applied unless a member holds round r+1 within a few seconds
        ahead = AheadWatch(r + 1)
        wait_s = STATE_TIMEOUT_S
        if outcome.kind != "excluded" and outcome.roster is not None:
            ahead, wait_s = AheadWatch(r + 1, frozenset({outcome.roster.leader}), UNDECIDED_GRACE_S), UNDECIDED_WAIT_S
        if self.failures:
            pause_s = min(BACKOFF_S[0] * 2 ** (self.failures - 1), BACKOFF_S[1])
            log.info("round %d: trying again to get the state of round %d in %.0f s", r, r + 1, pause_s)
            await asyncio.sleep(pause_s)
        self.core.phase = swarm.SYNC
        try:
            new = await self.catch_up(state, r + 1, Deadline(wait_s), ahead)
        except NobodyAhead as e:
            self.failures = 0
            outcome.reason += f"; {e}: kept the state of round {r} to train it again"
            self.core.rounds.pop(r, None)   # a new attempt at round r gets a new group
            return state
        except (TimeoutError, RuntimeError) as e:
            self.failures += 1
            outcome.reason += f"; could not get the state of round {r + 1} ({e}); kept round {r}"
            self.core.rounds.pop(r, None)
            return state
        self.failures = 0
        outcome.kind, outcome.reason = "excluded", f"{outcome.reason}; took the swarm's state of round {new.round}"
        await self.adopt(new)
        return new

    def track(self, outcome: Outcome) -> None:
        """Counts the rounds we miss; after a few, checks whether our link can keep up at all."""
        if outcome.kind == "applied" and self.core.peer_id in outcome.contributors:
            self.missed = 0
            return
        self.missed += 1
        verdict = self.lag_verdict(self.missed)
        if verdict:
            raise CannotKeepUp(verdict)

    def lag_verdict(self, misses: int) -> str:
        """The one line that says our link is too slow for the run, once `misses` (rounds or
        downloads lost in a row) are evidence enough: one when an update takes over twice a
        round to reach us, MISSED_BEFORE_VERDICT when it takes over one. "" otherwise."""
        period_s, rate = self.core.round_clock.period_s(), self.fetch_rate_bps
        if period_s is None or rate is None or self.core.spec is None or misses < 1:
            return ""
        update = get_codec(wire_codec(self.core.spec)).encoded_size(self.core.numel)
        slowness = update / rate / period_s
        if slowness <= 1 or (slowness <= 2 and misses < MISSED_BEFORE_VERDICT):
            return ""
        return (f"cannot keep up with the swarm: this peer receives {rate / 1e6:.2f} MB/s, one round's update "
                f"is {update / 1e6:.2f} MB ({update / rate:.1f} s to fetch) and the swarm closes a round every "
                f"{period_s:.1f} s, so it would chase the swarm forever; use a faster link, or a run with a "
                f"larger --target-steps or a smaller --codec")

    # ---- getting a newer state -------------------------------------------------------------
    async def _view(self) -> None:
        """A fresh view of the swarm; a slow DHT read is logged, and the last view kept."""
        try:
            await self.core.refresh()
        except TimeoutError as e:
            log.info("%s; going on with the last view of the swarm", e)

    def _donors(self, min_round: int) -> list[swarm.PeerRecord]:
        """Live peers serving a state of round >= min_round, newest first."""
        return sorted((r for r in self.core.live_peers() if r.state_round >= min_round and r.addr),
                      key=lambda r: (-r.state_round, r.peer_id))

    def _measured(self, method: str, num_bytes: int, seconds: float) -> None:
        self.fetched_bytes[method] += num_bytes
        if num_bytes > 0 and seconds > 0:
            rate = num_bytes / seconds
            self.fetch_rate_bps = rate if self.fetch_rate_bps is None else 0.5 * self.fetch_rate_bps + 0.5 * rate

    async def download(self, min_round: int, deadline: Deadline, digest: str = "",
                       ahead: AheadWatch | None = None) -> GlobalState:
        """Waits for live donors of round >= min_round and downloads from them (a state of round
        min_round must have `digest` when one is given). `ahead`: we hold a state and wait for
        a newer one, which may never come (NobodyAhead). A failed attempt is tried again."""
        last_error = "no live peer holds it yet"
        core = self.core
        while not deadline.expired():
            await self._view()
            if ahead is not None:
                ahead.check(core.live_peers())
            donors = self._donors(min_round)
            if donors:
                received, started = Received(), time.monotonic()
                try:
                    state = await download(core.channels, [(r.peer_id, r.addr) for r in donors], min_round,
                                           core.peer_id, core.numel, core.spec_hash, deadline, received=received)
                    why = await digests.disputed(self.core, state)
                    if not why and digest and state.round == min_round and state.digest() != digest:
                        why = f"its digest {state.digest()[:12]} is not the agreed {digest[:12]}"
                    if not why:
                        self.fetched["download"] += 1
                        return state
                    last_error = why
                    self.fetch_failures["download"] += 1
                    log.warning("downloaded state rejected: %s; asking again", why)
                except (RuntimeError, TimeoutError) as e:
                    last_error = str(e)
                    self.failed_downloads += 1
                    self.fetch_failures["download"] += 1
                finally:
                    self._measured("download", received.num_bytes, time.monotonic() - started)
                verdict = self.lag_verdict(self.failed_downloads)
                if verdict:
                    raise CannotKeepUp(verdict)  # the state moves on faster than it reaches us
            await core.next_view(min(deadline.left(), 1.0))
        raise TimeoutError(f"no state of round >= {min_round} within the deadline: {last_error}")

    async def catch_up(self, state: GlobalState, min_round: int, deadline: Deadline,
                       ahead: AheadWatch | None = None) -> GlobalState:
        """The swarm's state of round >= min_round: by replaying the recent updates when a donor
        keeps them all (a few rounds behind), else by downloading the state. NobodyAhead when
        `ahead` sees that none will come."""
        spec = self.core.spec
        assert spec is not None
        donors: list[swarm.PeerRecord] = []
        ahead = ahead or AheadWatch(min_round)
        while not deadline.expired():
            await self._view()
            donors = self._donors(min_round)
            if donors:
                break
            ahead.check(self.core.live_peers())
            await self.core.next_view(min(deadline.left(), 1.0))
        for donor in donors[:2]:
            if donor.state_round - state.round > KEEP_ROUNDS:
                break  # the newest state is too far ahead to replay: download it
            received, started = Received(), time.monotonic()
            try:
                new = await replay(self.core.channels, (donor.peer_id, donor.addr), state, donor.state_round,
                                   spec.outer_lr, spec.outer_momentum, deadline, received)
                self._measured("replay", received.num_bytes, time.monotonic() - started)
                why = await digests.disputed(self.core, new)
                if not why:
                    self.fetched["replay"] += 1
                    return new
                self.fetch_failures["replay"] += 1
                log.warning("replayed state rejected: %s", why)
            except (ValueError, TimeoutError, asyncio.TimeoutError) as e:
                self.fetched_bytes["replay"] += received.num_bytes
                self.fetch_failures["replay"] += 1
                log.info("replaying the updates of %s failed (%s); trying another way", donor.peer_id[-6:], e)
        return await self.download(min_round, deadline, ahead=ahead)

    # ---- digests: the DHT side is digests.py -------------------------------------------------
    async def check_digest(self, state: GlobalState, outcome: Outcome) -> GlobalState:
        """Compares our digest with those every live peer signed for the round (each a distinct
        identity: its own protected subkey); a peer in the minority reloads the state of a digest
        that a quorum of the signers (`swarm.quorum`: a strict majority) published. Without one
        (a tie, e.g. one peer against us) everyone keeps its state."""
        expected = {m.peer_id for m in outcome.roster.members} if outcome.roster is not None else set()
        signed = await digests.live(self.core, state, expected)
        best, count = swarm.majority_digest(signed)
        mine = state.digest()
        if best is None or best == mine:
            return state
        if count < swarm.quorum(len(signed)):   # e.g. one peer against us: no side is trusted
            log.warning("round %d: our digest %s differs from %s of %d of %d live peers, short of a quorum of %d "
                        "signers; keeping our state", state.round, mine[:12], best[:12], count, len(signed),
                        swarm.quorum(len(signed)))
            return state
        self.divergences += 1
        log.warning("round %d: our digest %s differs from the majority's %s (%d of %d live peers); reloading",
                    state.round, mine[:12], best[:12], count, len(signed))
        self.core.phase = swarm.SYNC
        try:
            new = await self.download(state.round, Deadline(STATE_TIMEOUT_S), digest=best)
        except (TimeoutError, NobodyAhead) as e:
            log.warning("round %d: reloading failed: %s; keeping our state", state.round, e)
            return state
        self.core.updates.clear()
        await self.adopt(new)
        await digests.publish(self.core, new)   # ours is the majority's now: no stale minority digest stays
        return new
