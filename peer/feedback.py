"""Error feedback: a peer's flat residual of what its lossy encodings lost (as a member, and as an
owner re-encoding a reduced shard), carried into the next round's encoding, and the pending update
a round commits when it applies. Pure CPU torch; the codecs themselves are peer/codecs.py."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from peer.codecs import all_finite


@dataclass(frozen=True)
class ResidualUpdate:
    """What encoding one shard lost, committed only when its round applies:
    residual[start:start + len(target)] = target - decoded, with decoded = codec.decode(encoded) when
    encoded is the payload. owner_round is the round of an owner's re-encoding, None for a member's send."""

    start: int
    numel: int  # of the whole flat model: the residual's size
    target: torch.Tensor
    encoded: bytes | torch.Tensor  # the payload (decoded at commit), or its decoding
    owner_round: int | None = None


class ErrorFeedback:
    """This peer's error-feedback residual: one flat float32 tensor of the model's numel (zeros from the
    first update on), sliced by the shard bounds of the current roster, so it outlives any change of
    group size. Local, never shared; not thread-safe: only the net loop updates and copies it (a
    checkpoint takes its copy on the loop, with the state it belongs to).

    A member sends shard [a, b): t = ef.compensate(a, x, numel); p = codec.encode(t); when the round
    applied and the shard's header lists this peer as a contributor: ef.update(a, t, decode(p), numel).
    Slices of other shards keep their residual. With decay < 1 (the run's ef_decay) the residual counts
    decay x itself in t: work left out for many rounds fades instead of piling up behind inner steps
    that, starting from the global state, do it again.

    An owner re-encodes its reduced shards the same way but commits with ef.update_owned(round, ...).
    Its residual is meaningful only on the ranges it owned in the last round it committed: the first
    update of a new round zeroes the residual outside that round's owned ranges. So a newly owned range
    is compensated with the old residual where it overlaps what this peer owned before (the shard map
    held there) and with zeros elsewhere (that error belonged to a range another peer encoded since;
    it is dropped, never re-added rounds later).
    """

    def __init__(self, decay: float = 1.0) -> None:
        self._residual: torch.Tensor | None = None
        self._owned_round: int | None = None  # the round of the last update_owned
        self.decay = decay   # the run's ef_decay for a member's residual (SparseLoCo's beta); 1 for an owner's

    def compensate(self, start: int, x: torch.Tensor, numel: int) -> torch.Tensor:
        """x + decay * residual[start:start + len(x)] as a new tensor (the product one float32
        rounding, the sum another), or x itself before the first update. Never mutates x."""
        end = self._check_slice(start, x, numel)
        if self._residual is None:
            return x
        kept = self._residual[start:end] if self.decay == 1.0 else torch.mul(self._residual[start:end], self.decay)
        return torch.add(x, kept)

    def update(self, start: int, target: torch.Tensor, decoded: torch.Tensor, numel: int) -> None:
        """residual[start:start + len(target)] = target - decoded (what the encode lost); the rest stays."""
        end = self._check_slice(start, target, numel)
        _check_same_shape(start, target, decoded)
        if self._residual is None:
            self._residual = torch.zeros(numel, dtype=torch.float32)
        torch.sub(target, decoded, out=self._residual[start:end])   # target is never the residual's memory

    def update_owned(self, round_: int, start: int, target: torch.Tensor, decoded: torch.Tensor,
                     numel: int) -> None:
        """An owner's update: as update(), but the first one of a round zeroes the rest (see the class)."""
        self._check_slice(start, target, numel)
        if self._residual is not None and round_ != self._owned_round:
            self._residual.zero_()
        self._owned_round = round_
        self.update(start, target, decoded, numel)

    def residual(self) -> torch.Tensor | None:
        """A copy of the flat residual; None before the first update."""
        return None if self._residual is None else self._residual.clone()

    def clear(self) -> None:
        self._residual, self._owned_round = None, None

    def state_dict(self) -> dict[str, torch.Tensor]:
        """{"residual": a copy} for checkpoints, {} before the first update. An owner's residual needs
        nothing more: it is zero outside the ranges it owned, and a resumed peer's next update is for a
        new round."""
        return {} if self._residual is None else {"residual": self._residual.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor], numel: int | None = None) -> None:
        """Replace the residual with a copy of state["residual"] ({} clears it). ValueError unless it is
        a finite 1-D float32 tensor of numel values (numel given, or the size of the residual held)."""
        if not isinstance(state, dict) or set(state) - {"residual"}:
            keys = sorted(map(repr, state)) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"residual state must be {{}} or {{'residual': tensor}}, got keys {keys} "
                             "(peer.checkpoint.load converts the keyed residuals of older checkpoints)")
        r = state.get("residual")
        if r is not None:
            expected = numel if numel is not None else (None if self._residual is None else self._residual.numel())
            check_flat_residual(r, expected)
            r = r.detach().to("cpu", copy=True).contiguous()
        self._residual, self._owned_round = r, None

    def _check_slice(self, start: int, x: torch.Tensor, numel: int) -> int:
        """start + len(x), once x is a 1-D float32 slice within [0, numel) of a residual of numel values."""
        end = start + x.numel()
        if x.dim() != 1 or x.dtype != torch.float32 or start < 0 or end > numel:
            raise ValueError(f"residual slice [{start}, {end}) of a {numel}-value model: expected a 1-D "
                             f"float32 slice within it, got shape {tuple(x.shape)} dtype {x.dtype}")
        if self._residual is not None and self._residual.numel() != numel:
            raise ValueError(f"the residual has {self._residual.numel()} values, the model {numel}")
        return end


def check_flat_residual(r: object, numel: int | None) -> None:
    """ValueError unless r is a finite 1-D float32 tensor (of numel values when numel is given)."""
    if not isinstance(r, torch.Tensor) or r.dtype != torch.float32 or r.dim() != 1:
        what = f"{r.dtype} shape {tuple(r.shape)}" if isinstance(r, torch.Tensor) else type(r).__name__
        raise ValueError(f"residual: expected a 1-D float32 tensor, got {what}")
    if numel is not None and r.numel() != numel:
        raise ValueError(f"residual: {r.numel()} values, expected {numel} (the model's size)")
    if not all_finite(r):
        raise ValueError(f"residual: {int((~torch.isfinite(r)).sum())} non-finite values")


def _check_same_shape(start: int, a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"residual slice at {start}: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")
