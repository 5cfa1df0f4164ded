"""Lying owners (--verify-shards, --trusted-owners). With verification each shard is reduced twice,
by its owner and by its backup owner (the next shard's owner), from the same contributions, without
owner error feedback, so two honest reducers give the same bytes; a member applies a reduced shard
only when the two headers agree (result hash, contributors, weights, the hash of every part). When
they do not, the round is not applied and every member that saw it suspects whom the evidence
names, for a number of rounds that doubles each time: a leader gives a suspected reducer no shard
and refuses a suspected contributor's Join. Pure, except `Suspects`' state; runs on the network loop."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from peer._proto import peer_pb2 as pb
from peer.config import RunSpec, trusted_owners, verifies_shards

log = logging.getLogger(__name__)

SUSPECT_ROUNDS = 5     # rounds a first suspicion lasts; doubled for each further one (at most MAX)
MAX_SUSPECT_ROUNDS = 640


@dataclass(frozen=True)
class Mismatch:
    """Why the two reductions of one shard differ, and whom that points at."""

    reason: str
    reducers: tuple[str, ...] = ()      # one of these lied about the reduction (or both reduced apart)
    contributors: tuple[str, ...] = ()  # sent different parts to the two reducers (or were framed)


def compare(owner: str, a: pb.ShardHeader, backup: str, b: pb.ShardHeader, me: str, my_sha: str) -> Mismatch | None:
    """None when the owner's header `a` and the backup's `b` describe the same result. Otherwise
    whom it points at. `my_sha`: the hash of our part when both reducers accepted it ("" if not).
    Our part missing from one list, or listed with another hash than we sent, names that reducer;
    another contributor in one list only, or listed with two hashes, is named (it sent the two
    reducers different parts, or none to one); equal parts reduced to different bytes name both
    reducers."""
    if a.sha256 == b.sha256 and list(a.contributors) == list(b.contributors) and list(a.weights) == list(b.weights) \
            and list(a.parts_sha256) == list(b.parts_sha256):
        return None
    parts_a = dict(zip(a.contributors, a.parts_sha256, strict=False))
    parts_b = dict(zip(b.contributors, b.parts_sha256, strict=False))
    if my_sha:
        for reducer, parts in ((owner, parts_a), (backup, parts_b)):
            if parts.get(me) != my_sha:
                return Mismatch(f"{reducer[-6:]} lists our part {'with a hash we did not send' if me in parts else 'as missing'}",
                                reducers=(reducer,))
    differ = {p for p in set(parts_a) | set(parts_b) if parts_a.get(p) != parts_b.get(p)}
    split = tuple(sorted(differ - {me}))
    if split:
        return Mismatch(f"{', '.join(p[-6:] for p in split)} sent the two reducers different parts (or one none)",
                        contributors=split)
    if differ:   # only our part, which one reducer did not take: nobody lied that we can tell
        return Mismatch("our part reached only one of the two reducers")
    if len(parts_a) != len(a.contributors) or len(parts_b) != len(b.contributors):
        return Mismatch("a reduced header lists no hash for some part", reducers=(owner, backup))
    return Mismatch(f"the same parts reduced to different results ({a.sha256[:8]} vs {b.sha256[:8]})",
                    reducers=(owner, backup))


@dataclass
class Suspects:
    """Peers a mismatch pointed at, with the round their suspicion ends; a peer's suspicion lasts
    SUSPECT_ROUNDS, doubled for every earlier one."""

    until: dict[str, int] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    kinds: dict[str, str] = field(default_factory=dict)   # "reducer" or "contributor"
    seen: set[tuple[int, int]] = field(default_factory=set)   # (round, shard) already counted

    def add(self, round_: int, shard: int, m: Mismatch) -> None:
        if (round_, shard) in self.seen:
            return
        self.seen.add((round_, shard))
        for kind, peers in (("reducer", m.reducers), ("contributor", m.contributors)):
            for p in peers:
                self.counts[p] = self.counts.get(p, 0) + 1
                span = min(MAX_SUSPECT_ROUNDS, SUSPECT_ROUNDS * 2 ** (self.counts[p] - 1))
                self.until[p] = max(self.until.get(p, 0), round_ + 1 + span)
                self.kinds[p] = kind
                log.warning("round %d: suspecting %s as a %s for %d rounds (shard %d: %s)",
                            round_, p[-6:], kind, span, shard, m.reason)

    def reducers(self, round_: int) -> set[str]:
        """Peers not to give a shard in `round_`."""
        return {p for p, end in self.until.items() if end > round_}

    def contributors(self, round_: int) -> set[str]:
        """Peers whose Join a leader refuses in `round_` (they sent two different parts of a shard)."""
        return {p for p, end in self.until.items() if end > round_ and self.kinds.get(p) == "contributor"}


@dataclass(frozen=True)
class OwnerRule:
    """Which serving members a leader may give shards: only trusted ones when the run names them,
    and not suspected reducers while enough others serve (two with --verify-shards, one without)."""

    trusted: frozenset[str] = frozenset()   # empty: any serving member
    avoid: frozenset[str] = frozenset()
    verify: bool = False

    @classmethod
    def of(cls, spec: RunSpec | None, suspected: set[str]) -> OwnerRule:
        if spec is None:
            return cls()
        return cls(frozenset(trusted_owners(spec)), frozenset(suspected), verifies_shards(spec))

    def eligible(self, serving: list[pb.Member]) -> list[pb.Member]:
        """The members that may own shards (empty: no trusted owner joined)."""
        allowed = [m for m in serving if not self.trusted or m.peer_id in self.trusted]
        kept = [m for m in allowed if m.peer_id not in self.avoid]
        return kept if len(kept) >= min(len(allowed), 2 if self.verify else 1) else allowed
