"""The one synchronous facade the trainer imports: it owns the network loop thread, the gRPC
server and the core, and turns each network operation into a call with a deadline."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import hivemind
import torch
from hivemind.utils import get_dht_time

from peer.config import ConfigError, PeerConfig, RunSpec, spec_conflicts
from peer.net import restart, swarm
from peer.net.core import NetCore
from peer.net.loop import Deadline, NetLoop
from peer.net.member import run_round
from peer.net.replay import KEEP_ROUNDS, replay
from peer.net.round import MAX_CARRY_ROUNDS, Outcome  # noqa: F401 - the trainer's view of a round
from peer.net.server import start_server
from peer.net.state_sync import StateSnapshot, download
from peer.outer import GlobalState

log = logging.getLogger(__name__)
SPEC_SETTLE_S = 3.0   # how long competing spec proposals may take to show up in the DHT


def announce_host(dht: hivemind.DHT) -> str:
    """The IP others reach this machine at, read from the DHT's visible addresses (loopback last)."""
    hosts = []
    for maddr in dht.get_visible_maddrs():
        parts = str(maddr).split("/")
        if len(parts) > 2 and parts[1] in ("ip4", "ip6"):
            hosts.append(parts[2] if parts[1] == "ip4" else f"[{parts[2]}]")
    hosts.sort(key=lambda h: h.startswith("127.") or h == "[::1]")
    return hosts[0] if hosts else "127.0.0.1"


class NobodyAhead:
    """Ends a wait for a state of round >= min_round once no live peer has been at that round
    for a while: the peer that was ahead died (its record went stale), none will come."""

    def __init__(self, min_round: int):
        self.min_round, self.since = min_round, time.monotonic()

    def check(self, live: list[swarm.PeerRecord]) -> None:
        if any(max(r.round, r.state_round) >= self.min_round for r in live):
            self.since = time.monotonic()
        elif time.monotonic() - self.since > swarm.FRESH_S:
            raise TimeoutError(f"no live peer is at round {self.min_round} or later any more")


class Node:
    def __init__(self, cfg: PeerConfig, dht: hivemind.DHT):
        self.cfg, self.dht = cfg, dht
        self.peer_id = dht.peer_id.to_base58()
        self.net = NetLoop()
        self.core = NetCore(dht, cfg, self.peer_id)
        self._server: Any = None
        self._refresher: Any = None

    # ---- lifecycle ----------------------------------------------------------------------
    def start(self) -> str:
        """Starts the loop and the gRPC server; returns the host:port others dial."""
        self.net.start()

        async def _start() -> int:  # kept on the loop at once: `stop` finds it even if a signal cut the wait
            self._server, port = await start_server(self.core, self.cfg.host, self.cfg.port)
            return port

        port = self.net.call(_start(), 30)
        host = self.cfg.host if self.cfg.host not in ("0.0.0.0", "::", "") else announce_host(self.dht)
        self.core.address = self.cfg.announce_addr or f"{host}:{port}"
        self._refresher = self.net.submit(self.core.refresh_forever())
        log.info("gRPC server listens on %s:%d, announced as %s", self.cfg.host, port, self.core.address)
        return self.core.address

    def stop(self, grace_s: float = 3.0, goodbye_s: float = 2.0) -> None:
        """Leaves the swarm and stops the network side, in at most about goodbye_s + grace_s + 7 s
        whatever hangs: a last record saying we are gone (best effort, and only while the DHT process
        lives), the gRPC server (calls in flight get grace_s), the client channels, then the loop.
        A failed goodbye skips nothing: a server left running on a closed loop breaks the exit."""
        goodbye = self.core.spec is not None and self.dht.is_alive()
        if self.core.spec is not None and not goodbye:
            log.warning("the DHT process is gone: leaving without telling the swarm")

        async def _stop() -> None:
            if self._refresher is not None:  # its next record must not undo our goodbye
                self._refresher.cancel()
            self.core.training, self.core.snapshot, self.core.address = False, None, ""
            if goodbye:  # tell the others we are gone: no leader, no donor
                try:
                    await asyncio.wait_for(self.core.publish(), goodbye_s)
                except Exception as e:
                    log.info("could not tell the swarm that we leave: %s", str(e) or type(e).__name__)
            if self._server is not None:
                await self._server.stop(grace_s)
                self._server = None
            await self.core.channels.close()

        if self.net.loop.is_running():  # not when a signal came before `start` ran it
            try:
                self.net.call(_stop(), goodbye_s + grace_s + 2)
            except Exception as e:
                log.warning("stopping the gRPC server and channels: %s", str(e) or type(e).__name__)
        self.net.stop()

    # ---- the run spec -------------------------------------------------------------------
    def resolve_spec(self, wanted: RunSpec, explicit: set[str], timeout_s: float = 30.0) -> RunSpec:
        """Adopts the run's spec, or proposes ours when the run has none; conflicts -> ConfigError."""
        spec = self.net.call(self._resolve_spec(wanted), timeout_s)
        conflicts = spec_conflicts(spec, wanted, explicit)
        if conflicts:
            raise ConfigError("; ".join(conflicts))
        self.core.spec, self.core.spec_hash = spec, spec.hash()
        return spec

    async def _resolve_spec(self, wanted: RunSpec) -> RunSpec:
        key = swarm.spec_key(self.cfg.run_id)
        proposals = await swarm.read(self.dht, key, 10.0)
        if not proposals:
            mine = {"spec": wanted.to_record(), "created": get_dht_time(), "origin": self.peer_id}
            await swarm.store(self.dht, key, self.peer_id, mine, 10.0)
            if self.cfg.initial_peers:
                await asyncio.sleep(SPEC_SETTLE_S)
            proposals = await swarm.read(self.dht, key, 10.0) or {self.peer_id: mine}
        valid = []
        for v in proposals.values():
            if isinstance(v, dict) and isinstance(v.get("created"), (int, float)) and isinstance(v.get("origin"), str):
                valid.append(v)
        if not valid:
            raise RuntimeError(f"the run {self.cfg.run_id} has only malformed spec records in the DHT")
        winner = min(valid, key=lambda v: (v["created"], v["origin"]))
        self._spec_record = self.core.spec_record = winner
        spec = RunSpec.from_record(winner["spec"])
        if winner["origin"] == self.peer_id:
            log.info("started run %s with spec %s", self.cfg.run_id, spec.hash())
        else:
            log.info("joined run %s (spec %s, started by %s)", self.cfg.run_id, spec.hash(), winner["origin"][-6:])
        return spec

    def is_genesis(self) -> bool:
        return self._spec_record["origin"] == self.peer_id

    # ---- state --------------------------------------------------------------------------
    def set_numel(self, numel: int) -> None:
        self.core.numel = numel

    def publish_state(self, state: GlobalState) -> None:
        """Hands over a snapshot of the global state (the trainer keeps its own tensors)."""
        snap = StateSnapshot.of(state, self.core.spec_hash)
        self.net.loop.call_soon_threadsafe(setattr, self.core, "snapshot", snap)

    def download_state(self, min_round: int, timeout_s: float, digest: str = "") -> GlobalState:
        """Waits for a live donor holding round >= min_round and downloads from it (a state of
        round min_round must have `digest` when one is given)."""
        return self.net.call(self._download(min_round, Deadline(timeout_s), digest), timeout_s + 5)

    def agree_on_checkpoint(self, mine: tuple[int, str], want: int, wait_s: float) -> tuple[int, str, int, int]:
        """After a full stop: the checkpoint the restarting peers agree on (see restart.py)."""
        return self.net.call(restart.agree(self.core, mine, want, Deadline(wait_s)), wait_s + 15)

    def _donors(self, min_round: int) -> list[swarm.PeerRecord]:
        """Live peers serving a state of round >= min_round, newest first."""
        return sorted((r for r in self.core.live_peers() if r.state_round >= min_round and r.addr),
                      key=lambda r: (-r.state_round, r.peer_id))

    async def _download(self, min_round: int, deadline: Deadline, digest: str = "", behind: bool = False
                        ) -> GlobalState:
        """`behind`: we hold a state and wait for a newer one, which may never come (NobodyAhead)."""
        last_error = "no live peer holds it yet"
        ahead = NobodyAhead(min_round)
        while not deadline.expired():
            await self.core.refresh()
            if behind:
                ahead.check(self.core.live_peers())
            donors = self._donors(min_round)
            if donors:
                try:
                    state = await download(self.core.channels, [(r.peer_id, r.addr) for r in donors], min_round,
                                           self.peer_id, self.core.numel, self.core.spec_hash, deadline)
                    why = await self._disputed(state)
                    if not why and digest and state.round == min_round and state.digest() != digest:
                        why = f"its digest {state.digest()[:12]} is not the agreed {digest[:12]}"
                    if not why:
                        return state
                    last_error = why
                    log.warning("downloaded state rejected: %s; asking again", why)
                except RuntimeError as e:
                    last_error = str(e)
            await asyncio.sleep(0.5)
        raise TimeoutError(f"no state of round >= {min_round} within the deadline: {last_error}")

    def catch_up(self, state: GlobalState, min_round: int, timeout_s: float) -> GlobalState:
        """The swarm's state of round >= min_round: by replaying the recent updates when a donor
        keeps them all (a few rounds behind), else by downloading the state."""
        return self.net.call(self._catch_up(state, min_round, Deadline(timeout_s)), timeout_s + 5)

    async def _catch_up(self, state: GlobalState, min_round: int, deadline: Deadline) -> GlobalState:
        spec = self.core.spec
        assert spec is not None
        donors: list = []
        ahead = NobodyAhead(min_round)
        while not deadline.expired():
            await self.core.refresh()
            donors = self._donors(min_round)
            if donors:
                break
            ahead.check(self.core.live_peers())
            await asyncio.sleep(0.5)
        for donor in donors[:2]:
            if donor.state_round - state.round > KEEP_ROUNDS:
                break
            try:
                new = await replay(self.core.channels, (donor.peer_id, donor.addr), state, donor.state_round,
                                   spec.outer_lr, spec.outer_momentum, deadline)
                why = await self._disputed(new)
                if not why:
                    return new
                log.warning("replayed state rejected: %s", why)
            except (ValueError, asyncio.TimeoutError) as e:
                log.info("replaying the updates of %s failed (%s); trying another way", donor.peer_id[-6:], e)
        return await self._download(min_round, deadline, behind=True)

    def record_update(self, round_: int, outcome: Outcome, digest_after: str) -> None:
        """Keeps the update of a round this peer applied (or saw aborted) for replay by others."""
        roster = outcome.roster
        if roster is None or outcome.kind not in ("applied", "aborted"):
            return
        applied = outcome.kind == "applied"
        self.net.loop.call_soon_threadsafe(
            self.core.updates.add, round_, applied, roster.codec, list(roster.shard_bounds),
            outcome.payloads if applied else [], outcome.samples if applied else 0, digest_after)

    async def _disputed(self, state: GlobalState) -> str:
        """Why a downloaded state is not the one most peers published ("" when it is, or when
        fewer than two peers published a digest for its round yet)."""
        raw = await swarm.read(self.dht, swarm.digest_key(self.cfg.run_id, state.round), 5.0)
        best, count = swarm.majority_digest({p: d for p, d in raw.items() if isinstance(d, str)})
        if best is None or count < 2 or best == state.digest():
            return ""
        return (f"the state of round {state.round} has digest {state.digest()[:12]}, "
                f"{count} peers published {best[:12]}")

    def drain(self, timeout_s: float) -> None:
        """Before leaving: serves the shards this peer owns until every member fetched them."""
        try:
            self.net.call(self.core.drain(Deadline(timeout_s)), timeout_s + 2)
        except Exception as e:
            log.warning("stopped serving owned shards early: %s", e)

    def refresh(self) -> None:
        """Publishes our record and reads everyone's now, not at the next refresh tick."""
        self.net.call(self.core.refresh(), 15)

    # ---- rounds -------------------------------------------------------------------------
    def wait_for_peers(self, min_peers: int, timeout_s: float) -> int:
        """Round 0 waits until `min_peers` peers (us included) are in; returns how many are."""
        deadline, last_log = Deadline(timeout_s), 0.0
        while True:
            n = 1 + len(self.core.live_peers())
            if n >= min_peers or deadline.expired():
                return n
            if time.monotonic() - last_log > 10:
                log.info("round 0 waits for %d peers, %d in (%.0f s left)", min_peers, n, deadline.left())
                last_log = time.monotonic()
            time.sleep(0.2)

    def begin_round(self, round_: int) -> None:
        """Starts training for `round_` once the peers still finishing the round before have
        moved on (at most a join window): a peer that started early would fill the round's
        target alone and leave the others no step to contribute."""
        c = self.core
        c.round, c.steps, c.samples, c.rate, c.training = round_, 0, 0, 0.0, False
        self.net.submit(c.publish())
        deadline = Deadline(self.core.join_window_s())
        while not deadline.expired():
            behind = [r for r in c.live_peers(round_ - 1) if r.addr or r.client]
            if not behind:
                break
            time.sleep(0.1)
        else:
            log.info("round %d: starting although %s still finish round %d", round_,
                     ", ".join(r.peer_id[-6:] for r in behind), round_ - 1)
        c.training, c.others = True, (time.monotonic(), 0.0, 0.0)
        self.round_started = time.monotonic()
        self.net.submit(c.publish())

    def report_progress(self, steps: int, samples: int, steps_per_s: float) -> None:
        c = self.core
        c.steps, c.samples, c.rate = steps, samples, steps_per_s

    def should_stop(self, step_s: float) -> bool:
        """True when the next inner step could not finish before the swarm closes the round."""
        spec, c = self.core.spec, self.core
        assert spec is not None
        if c.swarm_round() > c.round:  # the swarm closed this round without us: stop and catch up
            return True
        if time.monotonic() - self.round_started + step_s > spec.max_round_seconds:
            return True
        when, their_steps, their_rate = c.others
        now = time.monotonic()
        remaining = spec.target_steps - c.steps - their_steps - their_rate * (now - when)
        return remaining < 1 + their_rate * step_s

    def average(self, round_: int, delta: torch.Tensor, weight: float, samples: int,
                carried: tuple[float, int] = (0.0, -1)) -> Outcome:
        """Hands over `delta` (the trainer no longer touches it) and returns the round's outcome.
        `carried` is the part of `weight` that is work of a missed round, and that round."""
        self.core.training = False
        self.net.submit(self.core.publish())
        limit = self.core.join_window_s() + 40 + 3 * self.core.transfer_timeout_s()
        try:
            return self.net.call(run_round(self.core, round_, delta, weight, samples, carried), limit)
        except TimeoutError as e:
            return Outcome("aborted", reason=str(e))

    # ---- digests ------------------------------------------------------------------------
    def publish_digest(self, round_: int, digest: str) -> None:
        self.net.submit(swarm.store(self.dht, swarm.digest_key(self.cfg.run_id, round_), self.peer_id, digest, 5.0))

    def majority_digest(self, round_: int, expected: int, wait_s: float) -> tuple[str | None, int, int]:
        """(majority digest, its count, digests seen) for `round_`, waiting up to `wait_s` for
        `expected` digests to show up."""
        async def _read() -> tuple[str | None, int, int]:
            deadline = Deadline(wait_s)
            while True:
                raw = await swarm.read(self.dht, swarm.digest_key(self.cfg.run_id, round_), 5.0)
                digests = {p: d for p, d in raw.items() if isinstance(d, str)}
                if len(digests) >= expected or deadline.expired():
                    best, count = swarm.majority_digest(digests)
                    return best, count, len(digests)
                await asyncio.sleep(0.2)

        try:
            return self.net.call(_read(), wait_s + 10)
        except TimeoutError:
            return None, 0, 0
