"""What a peer tells about itself over HTTP (`/status`), kept on the network loop.

The trainer hands each round's metrics row (the object it writes to `--metrics-file`) to the
loop with `Node.report_round` (a copy nobody changes afterwards: ARCHITECTURE.md section 2);
`Monitor.observe` keeps the last one and the run's totals. `/status` joins them with the
core's live fields, all read on the loop."""

from __future__ import annotations

import time
from collections import Counter
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from peer.net.core import NetCore


class Monitor:
    def __init__(self) -> None:
        self.started = time.time()
        self.last: dict[str, Any] | None = None   # the last round's metrics row
        self.outcomes: Counter[str] = Counter()   # rounds by outcome: applied, aborted, excluded
        self.bytes_sent = self.bytes_received = 0
        self.divergences = 0

    def observe(self, row: dict[str, Any]) -> None:
        """One round's metrics row, on the loop."""
        self.last = row
        self.outcomes[str(row.get("outcome", ""))] += 1
        self.bytes_sent += int(row.get("bytes_sent") or 0)
        self.bytes_received += int(row.get("bytes_received") or 0)
        self.divergences = int(row.get("divergences") or 0)

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
            "divergences": self.divergences, "last_round": self.last,
            "uptime_s": time.time() - self.started,
        }
