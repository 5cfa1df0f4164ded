"""What a peer tells about itself over HTTP (`/status`, and `/metrics` through peer/metrics.py)
and in its DHT history record, kept on the network loop.

The trainer hands each round's metrics row (the object it writes to `--metrics-file`) to the
loop with `Node.report_round` (a copy nobody changes afterwards: ARCHITECTURE.md section 2);
`Monitor.observe` keeps the last one, the run's totals and the recent rounds. `/status` joins
them with the core's live fields, all read on the loop; `publish_forever` stores the recent
rounds as `{run}.history` (the swarm page's curves and drops) after each round and before the
record expires. Nothing here is touched from another thread."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from typing import TYPE_CHECKING, Any

from prometheus_client import Histogram

from peer.net import swarm

if TYPE_CHECKING:
    import hivemind

    from peer.net.core import NetCore

log = logging.getLogger(__name__)
HISTORY_REFRESH_S = 10.0   # the history record is re-stored this often (it expires after RECORD_TTL_S)
ROUND_BUCKETS_S = (1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, float("inf"))
AVERAGE_BUCKETS_S = (0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 60, 120, 300, float("inf"))


class Monitor:
    def __init__(self) -> None:
        self.started = time.time()
        self.last: dict[str, Any] | None = None   # the last round's metrics row
        self.outcomes: Counter[str] = Counter()   # rounds by outcome: applied, aborted, excluded
        self.drops: Counter[str] = Counter()      # dropped peers over all rounds, by reason (round.DROP_REASONS)
        self.bytes_sent = self.bytes_received = 0
        self.samples = self.tokens = 0            # trained here, over all rounds
        self.divergences = 0
        self.rows: deque[list[Any]] = deque(maxlen=swarm.HISTORY_ROUNDS)   # compact rows, oldest first
        self.recent_drops: deque[list[Any]] = deque(maxlen=swarm.DROP_ROUNDS)     # [round, {peer: reason}]
        self._changed: asyncio.Event | None = None   # made on the loop by publish_forever
        # in no registry: peer/metrics.py yields them with the rest at scrape time
        self.round_seconds = Histogram("diloco_round_seconds", "Seconds per round, training and averaging",
                                       buckets=ROUND_BUCKETS_S, registry=None)
        self.average_seconds = Histogram("diloco_average_seconds", "Seconds per round from the hand-over of the "
                                         "delta to the next state", buckets=AVERAGE_BUCKETS_S, registry=None)

    def observe(self, row: dict[str, Any]) -> None:
        """One round's metrics row, on the loop."""
        self.last = row
        self.rows.append(swarm.history_row(row))
        drops = swarm.round_drops(row)
        if drops:
            self.recent_drops.append([int(row["round"]), drops])
        if self._changed is not None:
            self._changed.set()
        self.outcomes[str(row.get("outcome", ""))] += 1
        self.drops.update((row.get("drop_reasons") or {}).values())
        self.bytes_sent += int(row.get("bytes_sent") or 0)
        self.bytes_received += int(row.get("bytes_received") or 0)
        self.samples += int(row.get("samples") or 0)
        self.tokens += int(row.get("tokens") or 0)
        self.divergences = int(row.get("divergences") or 0)
        self.round_seconds.observe(float(row.get("round_seconds") or 0.0))
        self.average_seconds.observe(float(row.get("average_seconds") or 0.0))

    def status(self, core: NetCore) -> dict[str, Any]:
        """The peer now, as `/status` answers it."""
        state_round = core.snapshot.header.round if core.snapshot is not None else -1
        return {
            "peer_id": core.peer_id, "run_id": core.run_id, "address": core.address,
            "client_mode": core.client_mode, "spec_hash": core.spec_hash,
            "round": core.round, "phase": core.phase, "state_round": state_round,
            "steps": core.steps, "samples": core.samples, "steps_per_s": core.rate if core.training else 0.0,
            "peers_in_view": len(core.live_peers()),
            "deadlines": {"join_window_s": core.join_window_s(), "transfer_timeout_s": core.transfer_timeout_s()},
            "rounds": dict(self.outcomes), "bytes_sent": self.bytes_sent, "bytes_received": self.bytes_received,
            "drops": dict(self.drops), "divergences": self.divergences, "last_round": self.last,
            "uptime_s": time.time() - self.started,
        }

    def history(self) -> dict[str, Any]:
        """The value of our `{run}.history` record (swarm.parse_history reads it back)."""
        return {"rows": list(self.rows), "drops": list(self.recent_drops), "t": time.time()}

    async def publish_forever(self, dht: hivemind.DHT, run_id: str) -> None:
        """Stores the history record after every round and every HISTORY_REFRESH_S; a slow DHT is
        logged once and tried again at the next turn. Runs until cancelled (Node.stop)."""
        self._changed = asyncio.Event()
        failed = ""
        while True:
            # not asyncio.wait_for: on Python < 3.12 it can swallow a cancel that comes as the event
            # is set, and this loop would then outlive Node.stop
            waiter = asyncio.ensure_future(self._changed.wait())
            try:
                await asyncio.wait({waiter}, timeout=HISTORY_REFRESH_S)
            finally:
                waiter.cancel()
            self._changed.clear()
            if not self.rows:
                continue
            try:
                await swarm.store(dht, swarm.history_key(run_id), self.history(), 5.0)
                failed = ""
            except TimeoutError as e:
                if str(e) != failed:
                    log.warning("publishing our round history: %s; trying again in %.0f s", e, HISTORY_REFRESH_S)
                failed = str(e)
            except Exception:  # a bug, not a slow DHT: say so with the traceback, and keep publishing
                log.exception("publishing our round history failed")
