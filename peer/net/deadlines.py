"""Communication deadlines derived from what this peer measured (transfer rates, the swarm's
inner step times), kept between a floor and a ceiling the user sets; the values in force are
logged when they change."""

from __future__ import annotations

import logging

from peer.net.upload import RateMeter

log = logging.getLogger(__name__)
ASSUMED_RATE_BPS = 2e6    # before any transfer was measured: a slow home uplink
SLACK = 4.0               # a transfer may take this many times its measured duration ...
MARGIN_S = 2.0            # ... plus this much
JOIN_FLOOR_S = 3.0        # members reach the join within about one view refresh plus one inner step:
JOIN_BASE_S = 2.0         # the window is JOIN_BASE_S + JOIN_STEPS x the slowest step seen, at least
JOIN_STEPS = 2.0          # JOIN_FLOOR_S and at most --join-window-s


class Deadlines:
    def __init__(self, floor_s: float, ceiling_s: float, cap_bps: float = 0.0):
        self.floor_s, self.ceiling_s = floor_s, ceiling_s
        self.cap_bps = cap_bps     # --max-upload-mbit in bytes/s (0: none): no transfer is assumed faster
        self.meter = RateMeter()   # every Contribute and GetShard transfer, either way
        self._logged_s: float | None = None
        self._logged_join_s: float | None = None

    def join_window_s(self, slowest_step_s: float, most_s: float) -> float:
        """How long a leader waits for the members it expects: they trigger from the same
        estimate, so they arrive within a view refresh and one inner step of each other."""
        seconds = min(most_s, max(JOIN_FLOOR_S, JOIN_BASE_S + JOIN_STEPS * slowest_step_s))
        if self._logged_join_s is None or abs(seconds - self._logged_join_s) > 0.25 * self._logged_join_s:
            log.info("join window is now %.1f s (slowest inner step seen %.2f s; at least %.0f s, at most %.0f s)",
                     seconds, slowest_step_s, min(JOIN_FLOOR_S, most_s), most_s)
            self._logged_join_s = seconds
        return seconds

    @property
    def rate_bps(self) -> float | None:
        return self.meter.rate_bps

    @property
    def num_samples(self) -> int:
        return self.meter.num_samples

    def observe(self, num_bytes: int, seconds: float) -> None:
        """Records one finished transfer (an exponential moving average of its rate; transfers
        under upload.MIN_SAMPLE_BYTES are left out)."""
        self.meter.observe(num_bytes, seconds)

    def transfer_s(self, num_bytes: int) -> float:
        """How long moving `num_bytes` may take before the peer gives up on it."""
        rate = self.rate_bps or ASSUMED_RATE_BPS
        if self.cap_bps > 0:
            rate = min(rate, self.cap_bps)
        seconds = min(self.ceiling_s, max(self.floor_s, SLACK * num_bytes / rate + MARGIN_S))
        if self._logged_s is None or abs(seconds - self._logged_s) > 0.25 * self._logged_s:
            measured = (f"measured {self.rate_bps / 1e6:.1f} MB/s over {self.num_samples} transfers"
                        if self.rate_bps else f"assumed {ASSUMED_RATE_BPS / 1e6:.0f} MB/s, nothing measured yet")
            log.info("deadline for a transfer of %.1f MB is now %.1f s (%s; floor %.0f s, ceiling %.0f s)",
                     num_bytes / 1e6, seconds, measured, self.floor_s, self.ceiling_s)
            self._logged_s = seconds
        return seconds
