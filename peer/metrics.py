"""`/metrics`: one peer in the Prometheus text format, from a registry of its own (never the
process-wide default one). Runs on the network loop only: a scrape reads the totals the
`Monitor` keeps from the metrics rows and the core's and keeper's live fields right then, so
nothing crosses threads and nothing is kept twice. Names follow Prometheus' conventions
(`diloco_` prefix, `_total` counters, `_seconds`, `_bytes`); a peer is told apart by the
scrape's `instance` label, and `diloco_peer_info` names its peer id and run."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric

from peer.net import swarm
from peer.net.round import DROP_REASONS

if TYPE_CHECKING:
    from peer.monitor import Monitor
    from peer.net.core import NetCore
    from peer.net.keeper import Keeper

__all__ = ["CONTENT_TYPE_LATEST", "PeerMetrics"]
OUTCOMES = ("applied", "aborted", "excluded")
FETCH_METHODS = ("download", "replay")
PHASES = (swarm.SYNC, swarm.WAIT, swarm.TRAIN, swarm.AVERAGE)
# the last round's row: (metric, key, help)
LAST_ROUND = [
    ("diloco_loss", "loss", "Mean training loss of this peer's inner steps in the last round"),
    ("diloco_eval_loss", "eval_loss", "Loss on the held-out batches after the last round"),
    ("diloco_samples_per_second", "samples_per_s", "Samples per second trained here in the last round"),
    ("diloco_tokens_per_second", "tokens_per_s", "Tokens per second trained here in the last round"),
    ("diloco_group_size", "group_size", "Members of the last round's group (0: it joined none)"),
    ("diloco_round_last_seconds", "round_seconds", "Seconds the last round took"),
    ("diloco_average_last_seconds", "average_seconds", "Seconds the last round's averaging took"),
    ("diloco_last_round", "round", "The round number of the last round this peer ended"),
    ("diloco_last_round_timestamp_seconds", "time", "Unix time the last round ended"),
    ("diloco_global_samples", "global_samples", "Samples the swarm trained into the state this peer holds"),
]


class PeerMetrics:
    """The registry behind `/metrics`; `text()` renders it (on the loop)."""

    def __init__(self, monitor: Monitor, core: NetCore, keeper: Callable[[], Keeper | None]):
        self.monitor, self.core, self.keeper = monitor, core, keeper
        self.registry = CollectorRegistry()
        self.registry.register(self)

    def text(self) -> str:
        return generate_latest(self.registry).decode()

    def collect(self) -> Iterator[Metric]:
        yield from self._totals()
        yield from self._last_round()
        yield from self._live()

    def _totals(self) -> Iterator[Metric]:
        m = self.monitor
        yield _labelled(CounterMetricFamily("diloco_rounds", "Rounds this peer ended, by outcome",
                                            labels=["outcome"]), m.outcomes, OUTCOMES)
        yield _labelled(CounterMetricFamily("diloco_drops", "Peers dropped from applied rounds (missing from "
                                            "some shard), by reason", labels=["reason"]), m.drops, DROP_REASONS)
        for name, value, text in [
            ("diloco_sent_bytes", m.bytes_sent, "Bytes this peer sent in rounds (shards and results)"),
            ("diloco_received_bytes", m.bytes_received, "Bytes this peer received in rounds"),
            ("diloco_trained_samples", m.samples, "Samples this peer trained on"),
            ("diloco_trained_tokens", m.tokens, "Tokens this peer trained on"),
            ("diloco_divergences", m.divergences, "Reloads after this peer's digest differed from the majority's"),
        ]:
            yield CounterMetricFamily(name, text, value=value)
        yield from m.round_seconds.collect()
        yield from m.average_seconds.collect()
        keeper = self.keeper()
        for name, counts, text in [
            ("diloco_state_downloads", keeper.fetched if keeper else {},
             "States this peer got from the swarm: a whole download, or a replay of the last updates"),
            ("diloco_state_download_failures", keeper.fetch_failures if keeper else {},
             "Downloads and replays that ended without a state"),
            ("diloco_state_download_bytes", keeper.fetched_bytes if keeper else {},
             "Bytes received by downloads and replays, failed ones too"),
        ]:
            yield _labelled(CounterMetricFamily(name, text, labels=["method"]), counts, FETCH_METHODS)

    def _last_round(self) -> Iterator[Metric]:
        row = self.monitor.last or {}
        for name, key, text in LAST_ROUND:
            yield GaugeMetricFamily(name, text, value=_number(row.get(key)))

    def _live(self) -> Iterator[Metric]:
        c = self.core
        info = InfoMetricFamily("diloco_peer", "This peer and its run")
        info.add_metric([], {"peer_id": c.peer_id, "run_id": c.run_id, "address": c.address,
                             "client_mode": str(c.cfg.client_mode).lower(), "spec_hash": c.spec_hash})
        yield info
        phase = GaugeMetricFamily("diloco_phase", "What this peer does now (1 for the current phase)",
                                  labels=["phase"])
        for p in PHASES:
            phase.add_metric([p], 1.0 if c.phase == p else 0.0)
        yield phase
        state_round = c.snapshot.header.round if c.snapshot is not None else -1
        for name, value, text in [
            ("diloco_round", c.round, "The round this peer trains for (-1 before it holds a state)"),
            ("diloco_state_round", state_round, "The round of the state this peer serves (-1: none)"),
            ("diloco_round_steps", c.steps, "Inner steps this peer did in the current round"),
            ("diloco_steps_per_second", c.rate if c.training else 0.0, "Inner steps per second while training"),
            ("diloco_peers_in_view", len(c.live_peers()), "Live peers of the run this peer sees in the DHT"),
            ("diloco_join_window_seconds", c.join_window_s(), "The join window in force"),
            ("diloco_transfer_timeout_seconds", c.transfer_timeout_s(), "The deadline of one transfer in force"),
        ]:
            yield GaugeMetricFamily(name, text, value=value)


def _labelled(family: CounterMetricFamily, counts: Any, known: tuple[str, ...] | dict) -> CounterMetricFamily:
    """Every known label value (0 until it happens), then any other one seen."""
    for key in [*known, *sorted(set(counts) - set(known))]:
        family.add_metric([key], counts.get(key, 0))
    return family


def _number(value: Any) -> float:
    """A row's value as a sample; missing or null (no eval batches, no round yet) is NaN."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return math.nan
    return float(value)
