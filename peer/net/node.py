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

from peer import swarmview
from peer.config import EXIT_AUTH, ConfigError, PeerConfig, RunSpec, spec_conflicts, tls_conflict
from peer.identity import Identity
from peer.metrics import CONTENT_TYPE_LATEST, PeerMetrics
from peer.monitor import Monitor
from peer.net import announce, outsiders, owner, swarm, twin
from peer.net.announce import dht_tcp_address, join_host_port, visible_hosts
from peer.net.auth import AuthRefused
from peer.net.core import GRANT_FRESH_S, PROBE_TIMEOUT_S, NetCore
from peer.net.keeper import BACKOFF_S, STATE_TIMEOUT_S, CannotKeepUp, Keeper, RoundResult  # noqa: F401
from peer.net.loop import Deadline, NetLoop
from peer.net.reach import split_host_port
from peer.net.round import MAX_CARRY_ROUNDS, Outcome  # noqa: F401 - the trainer's view of a round
from peer.net.server import start_server
from peer.outer import GlobalState
from peer.web import WebServer

log = logging.getLogger(__name__)
SPEC_SETTLE_S = 3.0   # how long competing spec proposals may take to show up in the DHT
CLIENT_SPEC_WAIT_S = 15.0  # how long a client-mode peer waits for a serving peer to start the run


def visible_maddrs(dht: hivemind.DHT) -> list[str]:
    """The DHT's own addresses as multiaddr strings (from the main thread: no deadline, see
    ARCHITECTURE section 2)."""
    return [str(m) for m in dht.get_visible_maddrs()]


class PendingRound:
    """A call handed to the network loop that the trainer polls between steps and reads once: a
    round (a RoundResult, or the keeper's exception, by its deadline), or a round's start barrier
    (when training began)."""

    def __init__(self, net, fut, deadline: float):
        self.net, self.fut, self.deadline = net, fut, deadline

    def done(self) -> bool:
        return self.fut.done()

    def result(self) -> RoundResult:
        return self.net.wait(self.fut, max(0.0, self.deadline - time.monotonic()))

class Node:
    def __init__(self, cfg: PeerConfig, dht: hivemind.DHT, identity: Identity):
        if dht.peer_id.to_base58() != identity.peer_id:
            raise ValueError(f"the DHT node runs as {dht.peer_id.to_base58()}, not as the identity {identity.peer_id}")
        self.cfg, self.dht, self.identity = cfg, dht, identity
        self.peer_id = identity.peer_id
        self.net = NetLoop()
        self.core = NetCore(dht, cfg, identity)
        # a peer refusing our run secret ends every wait of the trainer's at once: run.py exits 3
        self.core.signer.on_refused = lambda line: self.net.fail(AuthRefused(line))
        self._server: Any = None
        self.monitor = Monitor()   # on the loop: the last round and the totals, for /status
        self.web: WebServer | None = None   # --http-port
        self._refresher: Any = None
        self._historian: Any = None   # monitor.publish_forever: our {run}.history record
        self.keeper: Keeper | None = None   # made once the run spec is known (start_state)
        self.round_started = 0.0

    # ---- lifecycle ----------------------------------------------------------------------
    def start(self) -> str:
        """Starts the loop and the gRPC server; returns the host:port others dial."""
        self.net.start()

        async def _start() -> int:  # kept on the loop at once: `stop` finds it even if a signal cut the wait
            self._server, port = await start_server(self.core, self.cfg.host, self.cfg.port)
            if self.cfg.http_port:
                self.web = self.make_web()
                try:
                    await self.web.start(self.cfg.host, self.cfg.http_port)
                except OSError as e:
                    raise ConfigError(f"--http-port {self.cfg.http_port}: cannot listen on it ({e.strerror or e}); "
                                      "pick a free port or 0 for no HTTP server") from None
            return port

        port = self.net.call(_start(), 30)
        visible = visible_maddrs(self.dht)
        self.core.address = self.cfg.announce_addr or self._derive_address(port, visible)
        if self.core.address and not self.cfg.client_mode:
            host = split_host_port(self.core.address)[0]
            self.core.dht_address = dht_tcp_address(host, list(self.cfg.dht_announce_maddrs), visible)
        if self.identity.path:   # a key file may be copied: nobody else may publish as us (exit 3)
            self.net.call(twin.check(self.core, str(self.identity.path)), 20)
        self._refresher = self.net.submit(self.core.refresh_forever())
        self._historian = self.net.submit(self.monitor.publish_forever(self.dht, self.cfg.run_id))
        said = "nothing (client mode)" if self.core.client_mode else self.core.address
        log.info("gRPC server listens on %s:%d, announced as %s", self.cfg.host, port, said)
        return self.core.address

    def _derive_address(self, port: int, visible: list[str]) -> str:
        """Our gRPC address when --announce-addr does not say (announce.choose_host), with a
        warning when it is probably a container's own; '' (and client mode) when no address
        of ours routes to a swarm elsewhere."""
        initial = [announce.maddr_host(m) for m in self.cfg.initial_peers]
        peer_ip = announce.resolve(initial[0]) if initial and initial[0] else None
        src = announce.route_source(peer_ip) if peer_ip else None
        host = announce.choose_host(self.cfg.host, initial, src, visible_hosts(visible))
        if not host:
            log.warning("no address of this machine routes to the initial peer at %s: continuing in client mode "
                        "(sends and fetches, owns no shard, announces no address); pass --announce-addr "
                        "PUBLIC_IP:PORT to serve", peer_ip or initial[0])
            self.core.client_mode = True
            return ""
        if peer_ip is not None and not self.cfg.client_mode:
            dht_port = dht_tcp_address(host, [], visible).rsplit(":", 1)[-1]
            hint = announce.container_hint(
                host, peer_ip, announce.in_container(), announce.on_link(peer_ip, *announce.read_routes()),
                self.cfg.port, int(dht_port) if dht_port else None, False, bool(self.cfg.dht_announce_maddrs))
            if hint:
                log.warning("%s", hint)
        return join_host_port(host.strip("[]"), port)

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
            if self._historian is not None:
                self._historian.cancel()
            self.core.training, self.core.snapshot, self.core.address = False, None, ""
            if goodbye:  # tell the others we are gone: no leader, no donor
                try:
                    await asyncio.wait_for(self.core.publish(), goodbye_s)
                except Exception as e:
                    log.info("could not tell the swarm that we leave: %s", str(e) or type(e).__name__)
            if self.web is not None:
                await self.web.stop()
            if self._server is not None:
                await self._server.stop(grace_s)
                self._server = None
            await self.core.channels.close()

        if self.net.loop.is_running():  # not when a signal came before `start` ran it
            try:
                self.net.call(_stop(), goodbye_s + grace_s + 2, abortable=False)
            except Exception as e:
                log.warning("stopping the gRPC server and channels: %s", str(e) or type(e).__name__)
        self.net.stop()

    def make_web(self) -> WebServer:
        """The routes of --http-port; every handler runs on the loop."""
        web = WebServer()

        metrics = PeerMetrics(self.monitor, self.core, lambda: self.keeper)

        async def status(_request):
            return self.monitor.status(self.core)

        async def prometheus(_request):
            return metrics.text()

        web.add_json("/status", status)
        swarmview.add_routes(web, self.dht, self.cfg.run_id)   # the swarm page and its JSON
        web.add_text("/metrics", prometheus, CONTENT_TYPE_LATEST)
        return web

    def report_round(self, row: dict) -> None:
        """Hands the round's metrics row (a dict nobody changes afterwards) to the loop."""
        self.net.loop.call_soon_threadsafe(self.monitor.observe, row)

    # ---- the run spec -------------------------------------------------------------------
    def resolve_spec(self, wanted: RunSpec, explicit: set[str], timeout_s: float = 30.0) -> RunSpec:
        """Adopts the run's spec, or proposes ours when the run has none; conflicts -> ConfigError."""
        spec = self.net.call(self._resolve_spec(wanted), timeout_s)
        tls = tls_conflict(spec, wanted)
        if tls is not None:   # no certificates, or unwanted ones (exit 2); another CA's (exit 3)
            raise AuthRefused(tls[1]) if tls[0] == EXIT_AUTH else ConfigError(tls[1])
        conflicts = spec_conflicts(spec, wanted, explicit - {"tls_ca"})
        if conflicts:
            raise ConfigError("; ".join(conflicts))
        self.core.spec, self.core.spec_hash = spec, spec.hash()
        self.core.ef.decay = spec.ef_decay   # a member's residual only: an owner's is added whole
        return spec

    async def _resolve_spec(self, wanted: RunSpec) -> RunSpec:
        key = swarm.spec_key(self.cfg.run_id)
        proposals = await swarm.read(self.dht, key, 10.0)
        if not proposals and self.cfg.run_secret:   # the run's records may all be of another secret
            await outsiders.ask(self.core)          # its peers refuse ours: AuthRefused, exit 3
        deadline = Deadline(CLIENT_SPEC_WAIT_S)
        if not proposals and self.core.client_mode:
            log.info("client mode: waiting for a serving peer to start run %s", self.cfg.run_id)
        while not proposals and self.core.client_mode:  # nobody could download a state we created
            if deadline.expired():
                raise RuntimeError(f"no serving peer has started run {self.cfg.run_id} within "
                                   f"{CLIENT_SPEC_WAIT_S:.0f} s, and a client-mode peer cannot start one (nobody "
                                   f"could download its state): start the run on a reachable machine first")
            await asyncio.sleep(1.0)
            proposals = await swarm.read(self.dht, key, 5.0)
        if not proposals:
            mine = {"spec": wanted.to_record(), "created": get_dht_time(), "origin": self.peer_id}
            await swarm.store(self.dht, key, mine, 10.0)
            if self.cfg.initial_peers:
                await asyncio.sleep(SPEC_SETTLE_S)
            proposals = await swarm.read(self.dht, key, 10.0) or {self.peer_id: mine}
        winner = swarm.winning_spec(proposals)
        if winner is None:
            raise RuntimeError(f"the run {self.cfg.run_id} has only malformed spec records in the DHT")
        self._spec_record = self.core.spec_record = winner
        spec = RunSpec.from_record(winner["spec"])
        if winner["origin"] == self.peer_id:
            log.info("started run %s with spec %s", self.cfg.run_id, spec.hash())
        else:
            log.info("joined run %s (spec %s, started by %s)", self.cfg.run_id, spec.hash(), winner["origin"][-6:])
        return spec

    def is_genesis(self) -> bool:
        return self._spec_record["origin"] == self.peer_id

    # ---- state: decided on the loop, by the keeper ----------------------------------------
    def set_numel(self, numel: int) -> None:
        self.core.numel = numel

    def start_state(self, ckpt: GlobalState | None, fresh: GlobalState) -> GlobalState:
        """The state this peer starts from: its checkpoint's, the swarm's, or `fresh` for a new
        run (handed over: the trainer no longer changes these tensors)."""
        self.keeper = Keeper(self.core, self.is_genesis())
        return self.net.call(self.keeper.start(ckpt, fresh), 2 * STATE_TIMEOUT_S + 60)

    def finish_round(self, round_: int, delta: torch.Tensor, weight: float, samples: int,
                     carried: tuple[float, int] = (0.0, -1)) -> RoundResult:
        """Hands over `delta` (the trainer no longer touches it; weight 0: no inner step fit) and
        returns the next state with the round's outcome. `carried` is the part of `weight` that
        is work of a missed round, and that round. Raises CannotKeepUp."""
        return self.submit_round(round_, delta, weight, samples, carried).result()

    def submit_round(self, round_: int, delta: torch.Tensor, weight: float, samples: int,
                     carried: tuple[float, int] = (0.0, -1)) -> PendingRound:
        """finish_round without waiting (--overlap): the round runs on the loop while the trainer
        trains on; the trainer polls `done()` between steps and takes `result()` once."""
        round_s = self.core.join_window_s() + 40 + 3 * self.core.transfer_timeout_s()
        limit_s = round_s + 3 * STATE_TIMEOUT_S + BACKOFF_S[1] + 30
        assert self.keeper is not None
        fut = self.net.submit(self.keeper.finish_round(round_, delta, weight, samples, carried, round_s))
        return PendingRound(self.net, fut, time.monotonic() + limit_s)

    def checkpoint_parts(self) -> tuple[GlobalState | None, dict, dict]:
        """The global state with the residuals that go with it (one consistent moment)."""
        async def parts():
            assert self.keeper is not None
            return self.keeper.checkpoint_parts()

        return self.net.call(parts(), 30, abortable=False)

    def load_residuals(self, residuals: dict, owner_residuals: dict) -> None:
        async def load():
            self.core.ef.load_state_dict(residuals)
            self.core.owner_ef.load_state_dict(owner_residuals)

        self.net.call(load(), 30)

    def drain(self, timeout_s: float | None = None) -> None:
        """Before leaving: serves the shards this peer owns until every member fetched them, for
        at most `timeout_s` (default: one transfer's timeout at the measured rate)."""
        if timeout_s is None:
            timeout_s = self.core.transfer_timeout_s()
        try:
            self.net.call(owner.drain(self.core, Deadline(timeout_s)), timeout_s + 2)
        except Exception as e:
            log.warning("stopped serving owned shards early: %s", e)

    # ---- rounds -------------------------------------------------------------------------
    def wait_for_peers(self, min_peers: int, timeout_s: float) -> int:
        """Round 0 waits until `min_peers` peers (us included) hold the run's state; returns how many do."""
        async def wait() -> int:
            deadline, last_log = Deadline(timeout_s), 0.0
            while True:
                n = 1 + len(self.core.ready_peers())
                if n >= min_peers or deadline.expired():
                    return n
                if time.monotonic() - last_log > 10:
                    log.info("round 0 waits for %d peers holding the state, %d do (%.0f s left)", min_peers, n,
                             deadline.left())
                    last_log = time.monotonic()
                await self.core.next_view(min(deadline.left(), 1.0))

        return self.net.call(wait(), timeout_s + 10)

    def num_training(self, round_: int) -> int:
        """Peers training `round_` as far as we know, us included."""
        return 1 + sum(1 for r in self.core.live_peers(round_) if r.ready())

    def begin_round(self, round_: int) -> None:
        """Starts training for `round_` (see NetCore.begin_round: at most a join window's wait)."""
        self.began(self.submit_begin(round_))

    def submit_begin(self, round_: int) -> PendingRound:
        """begin_round without waiting (--overlap): the trainer trains the round's first steps while
        the barrier waits for the peers still finishing the round before, polling `done()` between
        steps; `began` then takes its result. No progress is reported before `began`."""
        fut = self.net.submit(self.core.begin_round(round_))
        return PendingRound(self.net, fut, time.monotonic() + self.core.join_window_s() + 15)

    def began(self, pending: PendingRound) -> None:
        """Waits for the barrier of `submit_begin` (at most what is left of its deadline)."""
        self.round_started = pending.result()

    def report_progress(self, steps: int, samples: int, steps_per_s: float) -> None:
        self.net.loop.call_soon_threadsafe(self.core.set_progress, steps, samples, steps_per_s)

    def report_ahead(self, steps: int, samples: int, steps_per_s: float) -> None:
        """Steps of the round trained before it began (--overlap): reported to the round's leader at
        once, its answer waited for (one round trip, at most PROBE_TIMEOUT_S), so that the trainer
        decides to stop and join only after the leader heard of them: they may fill the round's target
        before the next periodic report, and a leader refuses a claim it never saw (validate.join_claim)."""
        self.report_progress(steps, samples, steps_per_s)
        try:
            self.net.call(self.core.ask_for_steps(self.core.round, steps), PROBE_TIMEOUT_S + 1)
        except TimeoutError:
            pass

    @property
    def spec_hash(self) -> str:
        """The run spec's hash: fixed once the spec is agreed (start_state), read by the trainer."""
        return self.core.spec_hash

    def should_stop(self, steps: int, step_s: float) -> bool:
        """True when the next inner step could not finish before the swarm closes the round:
        the round's leader allows no more steps, or (without its answer) the DHT view says so.
        Read from the trainer thread: the loop replaces these values, never changes them."""
        spec, c = self.core.spec, self.core
        assert spec is not None
        if self.net.failed is not None:   # a refused run secret: the trainer stops here, not at its next call
            raise self.net.failed
        if c.swarm_round() > c.round:  # the swarm closed this round without us: stop and catch up
            return True
        now = time.monotonic()
        if now - self.round_started + step_s > spec.max_round_seconds:
            return True
        grant = c.grant
        fresh = grant is not None and grant[0] == c.round and now - grant[3] < GRANT_FRESH_S
        if steps == 0 and not fresh:  # the first step is always ours: the leader's answer may close
            return False              # the round after it, a DHT view that lags a refresh may not
        if fresh:
            if not grant[2] and steps >= grant[1]:  # used up: ask again before stopping (one round trip)
                try:
                    grant = self.net.call(c.ask_for_steps(c.round, steps), PROBE_TIMEOUT_S + 1) or grant
                except TimeoutError:
                    pass
            return grant[2] or steps >= grant[1]
        remaining, their_rate = self._dht_left(steps, now)
        return remaining < 1 + their_rate * step_s

    def _dht_left(self, steps: int, now: float) -> tuple[float, float]:
        """Steps of the round's target nobody did yet by the DHT view, and the others' steps/s."""
        assert self.core.spec is not None
        when, their_steps, their_rate = self.core.others
        return self.core.spec.target_steps - steps - their_steps - their_rate * (now - when), their_rate

    def swarm_left(self, steps: int) -> tuple[float, float, float]:
        """For the progress bar: (steps of the round's target left, the others' steps/s, seconds
        left before the round's time limit); no steps are left once the leader closes the round.
        Read from the trainer thread, like should_stop."""
        spec, c, now = self.core.spec, self.core, time.monotonic()
        assert spec is not None
        left_s = spec.max_round_seconds - (now - self.round_started)
        remaining, their_rate = self._dht_left(steps, now)
        grant = c.grant
        if grant is not None and grant[0] == c.round and now - grant[3] < GRANT_FRESH_S and grant[2]:
            remaining = 0.0
        return remaining, their_rate, left_s

