"""Per-caller resource limits of the gRPC server, checked by peer.net.auth.AuthInterceptor before a
handler runs: a request rate (token buckets) and calls at once, per caller host (before the
signature is checked: the cheap test first) and per signed peer id. A flood from one address or one
identity is refused with RESOURCE_EXHAUSTED and does not starve the other callers' round. Bytes in
flight per caller are bounded by its calls at once times one message (client.MAX_MESSAGE_BYTES, the
transport's bound) plus the one shard each Contribute may hold (its size is checked against the
roster before it is read). Runs on the network loop only."""

from __future__ import annotations

import time
from dataclasses import dataclass

# A member makes a handful of calls to one peer in a round (Join, Progress every 0.1 s, a Contribute
# and a GetShard per shard that peer owns or backs up, Commit) and a newcomer a few GetState ranges:
# these bounds are ten times that. A host may hold many peers (a machine running a local swarm).
PEER_RATE, PEER_BURST, PEER_CALLS = 100.0, 200.0, 32
HOST_RATE, HOST_BURST, HOST_CALLS = 1000.0, 2000.0, 256
MAX_TRACKED = 10_000   # callers remembered; idle ones are forgotten first


@dataclass
class _Bucket:
    tokens: float
    at: float
    calls: int = 0


class _Table:
    def __init__(self, rate: float, burst: float, calls: int):
        self.rate, self.burst, self.calls = rate, burst, calls
        self.buckets: dict[str, _Bucket] = {}

    def _get(self, key: str, now: float) -> _Bucket:
        b = self.buckets.get(key)
        if b is None:
            if len(self.buckets) >= MAX_TRACKED:
                self.buckets = {k: v for k, v in self.buckets.items() if v.calls or now - v.at < 60}
            b = self.buckets[key] = _Bucket(self.burst, now)
        b.tokens = min(self.burst, b.tokens + (now - b.at) * self.rate)
        b.at = now
        return b

    def enter(self, key: str, now: float) -> str:
        b = self._get(key, now)
        if b.calls >= self.calls:
            return f"{b.calls} calls at once already (the limit is {self.calls})"
        if b.tokens < 1:
            return f"more than {self.rate:g} calls/s"
        b.tokens -= 1
        b.calls += 1
        return ""

    def leave(self, key: str) -> None:
        b = self.buckets.get(key)
        if b is not None and b.calls > 0:
            b.calls -= 1


class CallerLimits:
    def __init__(self, peer=(PEER_RATE, PEER_BURST, PEER_CALLS), host=(HOST_RATE, HOST_BURST, HOST_CALLS)):
        self.peers, self.hosts = _Table(*peer), _Table(*host)
        self.refused = 0

    def enter_host(self, host: str) -> str:
        """Why a call from `host` is refused now ("" admits it: leave_host when it ends)."""
        why = self.hosts.enter(host, time.monotonic())
        self.refused += bool(why)
        return f"host {host}: {why}" if why else ""

    def enter_peer(self, peer_id: str) -> str:
        why = self.peers.enter(peer_id, time.monotonic())
        self.refused += bool(why)
        return f"peer {peer_id[-6:]}: {why}" if why else ""

    def leave_host(self, host: str) -> None:
        self.hosts.leave(host)

    def leave_peer(self, peer_id: str) -> None:
        self.peers.leave(peer_id)


def host_of(peer: str) -> str:
    """The caller's address without its port (`ipv4:10.0.0.5:4123` -> `ipv4:10.0.0.5`)."""
    return peer.rsplit(":", 1)[0] if peer.count(":") >= 2 else peer
