"""Codecs for float32 shards (fp32, int8 blockwise absmax) and the error-feedback residuals.
Pure CPU torch, single-rounding float32 ops only (every machine makes the same bytes); no net code."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Hashable
from typing import ClassVar

import numpy as np
import torch

_F32_LE = np.dtype("<f4")


class CodecError(ValueError):
    """Received bytes that do not decode to a valid tensor (wrong length, bad values)."""


def _check_input(x: torch.Tensor) -> None:
    """Raise ValueError unless x is a finite 1-D contiguous float32 CPU tensor."""
    if x.dim() != 1 or x.dtype != torch.float32 or x.device.type != "cpu" or not x.is_contiguous():
        raise ValueError(
            f"codecs encode 1-D contiguous float32 CPU tensors, got shape {tuple(x.shape)} "
            f"dtype {x.dtype} device {x.device} contiguous={x.is_contiguous()}"
        )
    if not bool(torch.isfinite(x).all()):
        raise ValueError("cannot encode a tensor with non-finite values")


def _f32_bytes(x: torch.Tensor) -> bytes:
    return np.asarray(x.detach().numpy(), dtype=_F32_LE).tobytes()


def _f32_from(data: bytes | memoryview) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(data, dtype=_F32_LE).astype(np.float32))


class Codec(ABC):
    """Encodes a 1-D float32 CPU tensor to bytes and back. Subclasses state their error bound."""

    name: ClassVar[str]
    ERROR_BOUND: ClassVar[str]

    @abstractmethod
    def encoded_size(self, numel: int) -> int:
        """Length in bytes of encode(x) for x of numel values."""

    def encode(self, x: torch.Tensor) -> bytes:
        """Bytes for x (finite, 1-D, contiguous, float32, CPU; ValueError otherwise)."""
        _check_input(x)
        return self._encode(x)

    def decode(self, data: bytes, numel: int) -> torch.Tensor:
        """A new 1-D float32 tensor of numel values; CodecError if data is not a valid encoding."""
        if numel < 0:
            raise ValueError(f"numel must be >= 0, got {numel}")
        expected_bytes = self.encoded_size(numel)
        if len(data) != expected_bytes:
            raise CodecError(
                f"{self.name} payload has {len(data)} bytes, expected {expected_bytes} for {numel} values"
            )
        return self._decode(memoryview(data), numel)

    @abstractmethod
    def _encode(self, x: torch.Tensor) -> bytes: ...

    @abstractmethod
    def _decode(self, data: memoryview, numel: int) -> torch.Tensor: ...


class Fp32Codec(Codec):
    """Raw little-endian float32. Exact: decode(encode(x)) == x bitwise."""

    name = "fp32"
    ERROR_BOUND = "exact"

    def encoded_size(self, numel: int) -> int:
        return 4 * numel

    def _encode(self, x: torch.Tensor) -> bytes:
        return _f32_bytes(x)

    def _decode(self, data: memoryview, numel: int) -> torch.Tensor:
        out = _f32_from(data)
        if not bool(torch.isfinite(out).all()):
            raise CodecError(f"fp32 payload has {int((~torch.isfinite(out)).sum())} non-finite values")
        return out


class Int8Codec(Codec):
    """Blockwise absmax int8: per BLOCK values one float32 scale = absmax/127, then q = round(x/scale).

    Layout: ceil(numel/BLOCK) little-endian float32 scales, then numel int8 values in [-127, 127];
    a zero block has scale 0 and all-zero q. ERROR_BOUND: the 2**-16 covers the float32 roundings of
    s, x/s and q*s (seen: up to 1.1e-5 * s/2 beyond s/2); 2**-142 matters only for subnormal scales.
    """

    name = "int8"
    ERROR_BOUND = "|x - decode(encode(x))| <= scale * (0.5 + 2**-16) + 2**-142, scale of x's block"
    BLOCK: ClassVar[int] = 256
    Q_MAX: ClassVar[int] = 127
    MAX_SCALE: ClassVar[float] = 2.0**120  # q * scale stays finite for |q| <= 127

    @classmethod
    def num_blocks(cls, numel: int) -> int:
        return -(-numel // cls.BLOCK)

    def encoded_size(self, numel: int) -> int:
        return 4 * self.num_blocks(numel) + numel

    def _per_value(self, scales: torch.Tensor, numel: int) -> torch.Tensor:
        return scales.repeat_interleave(self.BLOCK)[:numel]

    def _encode(self, x: torch.Tensor) -> bytes:
        numel = x.numel()
        padded = torch.zeros(self.num_blocks(numel) * self.BLOCK, dtype=torch.float32)
        padded[:numel] = torch.abs(x)
        scales = torch.div(padded.view(-1, self.BLOCK).amax(dim=1), float(self.Q_MAX))
        if bool((scales > self.MAX_SCALE).any()):
            raise ValueError(f"int8 codec: |x| too large (block scale above {self.MAX_SCALE:.3g})")
        safe_scales = torch.where(scales > 0, scales, torch.ones_like(scales))
        q = torch.round(torch.div(x, self._per_value(safe_scales, numel)))
        q = torch.clamp(q, -self.Q_MAX, self.Q_MAX).to(torch.int8)
        return _f32_bytes(scales) + q.numpy().tobytes()

    def _decode(self, data: memoryview, numel: int) -> torch.Tensor:
        scale_bytes = 4 * self.num_blocks(numel)
        scales = _f32_from(data[:scale_bytes])
        q = torch.from_numpy(np.frombuffer(data[scale_bytes:], dtype=np.int8).copy())
        self._check_scales(scales)
        self._check_q(q, scales, numel)
        return torch.mul(q.to(torch.float32), self._per_value(scales, numel))

    def _check_scales(self, scales: torch.Tensor) -> None:
        bad = ~torch.isfinite(scales) | (scales < 0) | (scales > self.MAX_SCALE)
        if bool(bad.any()):
            block = int(bad.nonzero()[0])
            raise CodecError(
                f"int8 payload: block {block} has scale {float(scales[block])!r}, "
                f"expected finite and in [0, {self.MAX_SCALE:.3g}]; {int(bad.sum())} bad scales"
            )

    def _check_q(self, q: torch.Tensor, scales: torch.Tensor, numel: int) -> None:
        if bool((q == -128).any()):
            raise CodecError(f"int8 payload: {int((q == -128).sum())} values are -128, expected [-127, 127]")
        stray = (q != 0) & (self._per_value(scales, numel) == 0)
        if bool(stray.any()):
            raise CodecError(f"int8 payload: {int(stray.sum())} nonzero values in blocks with scale 0")


CODECS: dict[str, Codec] = {codec.name: codec for codec in (Fp32Codec(), Int8Codec())}


def get_codec(name: str) -> Codec:
    """The codec called name; ValueError naming the choices if there is none."""
    try:
        return CODECS[name]
    except KeyError:
        raise ValueError(f"unknown codec {name!r}; choose one of: {', '.join(CODECS)}") from None


class ErrorFeedback:
    """Residuals of lossy encodes, keyed by e.g. a shard's (start, end) range; local, never shared.

    t = ef.compensate(k, delta); b = codec.encode(t); if the round accepted it:
    ef.update(k, t, codec.decode(b, n)). Otherwise the residual stays as it was (caller's choice).
    """

    def __init__(self) -> None:
        self._residuals: dict[Hashable, torch.Tensor] = {}

    def compensate(self, key: Hashable, x: torch.Tensor) -> torch.Tensor:
        """x + residual(key) as a new tensor, or x itself when there is no residual. Never mutates x."""
        residual = self._residuals.get(key)
        if residual is None:
            return x
        _check_same_shape(key, residual, x)
        return torch.add(x, residual)

    def update(self, key: Hashable, target: torch.Tensor, decoded: torch.Tensor) -> None:
        """Set residual(key) = target - decoded (what the encode lost)."""
        _check_same_shape(key, target, decoded)
        self._residuals[key] = torch.sub(target, decoded)

    def residual(self, key: Hashable) -> torch.Tensor | None:
        return self._residuals.get(key)

    def discard(self, key: Hashable) -> None:
        self._residuals.pop(key, None)

    def clear(self) -> None:
        self._residuals.clear()

    def keys(self) -> list[Hashable]:
        return list(self._residuals)

    def state_dict(self) -> dict[Hashable, torch.Tensor]:
        """A plain dict key -> residual copy, for checkpoints."""
        return {key: r.clone() for key, r in self._residuals.items()}

    def load_state_dict(self, state: dict[Hashable, torch.Tensor]) -> None:
        """Replace all residuals with copies of state's float32 tensors."""
        for key, r in state.items():
            if not isinstance(r, torch.Tensor) or r.dtype != torch.float32:
                raise ValueError(f"residual {key!r}: expected a float32 tensor, got {type(r).__name__}")
        self._residuals = {key: r.detach().to("cpu", copy=True).contiguous() for key, r in state.items()}


def _check_same_shape(key: Hashable, a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"residual {key!r}: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")
