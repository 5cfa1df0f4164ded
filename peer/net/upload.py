"""This peer's uplink: the `--max-upload-mbit` cap on what it sends (a token bucket every
outgoing shard and state stream of the process draws from, on the network loop) and the
measured upload rate it publishes, which the round's leader sizes its shard by (shardmap.py
`shard_plan`). The bucket sleeps until enough tokens exist (no polling); waiting is
cancellable, so a call's deadline still ends it."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Protocol, TypeVar

from peer.net.client import CHUNK_BYTES

MIN_SAMPLE_BYTES = 64 << 10   # smaller transfers measure latency, not rate
EMA_KEEP = 0.7                # weight of the old rate in each new measurement
ROUNDING_BYTES = 1e-3         # a shortfall this small is float rounding of the refill, not a wait


class RateMeter:
    """An exponential moving average of bytes / second over transfers of at least MIN_SAMPLE_BYTES."""

    def __init__(self) -> None:
        self.rate_bps: float | None = None
        self.num_samples = 0

    def observe(self, num_bytes: int, seconds: float) -> None:
        if seconds > 0:
            self.observe_rate(num_bytes / seconds, num_bytes)

    def observe_rate(self, rate: float, num_bytes: int) -> None:
        """A rate measured over `num_bytes` in all (too few: ignored)."""
        if num_bytes < MIN_SAMPLE_BYTES or not (math.isfinite(rate) and rate > 0):
            return
        self.rate_bps = rate if self.rate_bps is None else EMA_KEEP * self.rate_bps + (1 - EMA_KEEP) * rate
        self.num_samples += 1


class UploadCap:
    """A token bucket of `rate_bps` bytes / second holding at most `burst` bytes (rate 0: no cap).
    All streams share one: the sum of what they send over any span t is at most burst + rate * t.
    Takers queue in FIFO order behind one lock, so one stream cannot starve the others. `clock`
    and `sleep` are injectable so a test can check the accounting without timing anything."""

    def __init__(self, rate_bps: float, burst: int = CHUNK_BYTES, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep):
        if not (math.isfinite(rate_bps) and rate_bps >= 0) or burst < 1:
            raise ValueError(f"an upload cap needs a finite rate >= 0 and a burst >= 1 byte, "
                             f"not {rate_bps!r} B/s and {burst!r} bytes")
        self.rate_bps, self.burst = float(rate_bps), int(burst)
        self.clock, self.sleep = clock, sleep
        self.tokens = float(burst)
        self.stamp = clock()
        self.taken = 0          # bytes let through since the start
        self.waited_s = 0.0     # seconds takers slept for tokens, all together
        self._lock: asyncio.Lock | None = None

    def _refill(self) -> None:
        now = self.clock()
        self.tokens = min(float(self.burst), self.tokens + (now - self.stamp) * self.rate_bps)
        self.stamp = now

    async def take(self, num_bytes: int) -> None:
        """Returns once `num_bytes` may be sent (at once when there is no cap). Bytes beyond
        the burst are taken a burst at a time, so tokens never go below zero."""
        if self.rate_bps == 0 or num_bytes <= 0:
            self.taken += max(num_bytes, 0)
            return
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            left = num_bytes
            while left > 0:
                piece = min(left, self.burst)
                self._refill()
                while piece - self.tokens > ROUNDING_BYTES:  # a loop: the timer may wake a hair early
                    wait_s = (piece - self.tokens) / self.rate_bps
                    self.waited_s += wait_s
                    await self.sleep(wait_s)
                    self._refill()
                self.tokens = max(0.0, self.tokens - piece)
                self.taken += piece
                left -= piece


class _Chunk(Protocol):
    data: bytes


C = TypeVar("C", bound=_Chunk)


async def paced(cap: UploadCap, chunks: Iterable[C]) -> AsyncIterator[C]:
    """The chunks of one outgoing stream, each released once the cap lets its bytes go."""
    for chunk in chunks:
        await cap.take(len(chunk.data))
        yield chunk


def cap_bps(max_upload_mbit: float) -> float:
    """--max-upload-mbit in bytes / second (0: no cap)."""
    return max_upload_mbit * 1e6 / 8


def upload_estimate(meter: RateMeter, cap: float) -> float:
    """The upload rate this peer announces (bytes / second; 0 = nothing known): the measured
    rate, never above the cap; with nothing measured yet, the cap itself (an upper bound)."""
    measured = meter.rate_bps or 0.0
    if cap > 0:
        return min(measured, cap) if measured > 0 else cap
    return measured
