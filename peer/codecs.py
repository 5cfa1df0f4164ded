"""Codecs for float32 shards (fp32, fp16, bf16, int8 and int4 blockwise absmax; sparse top-k in
peer/sparse.py); the error-feedback residuals of the lossy ones are peer/feedback.py.
Pure CPU torch, single-rounding float32 ops only (every machine makes the same bytes); no net code."""

from __future__ import annotations

import math
import sys
import warnings
from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np
import torch

from peer.hostmem import empty_f32

_F32_LE = np.dtype("<f4")
_SLAB = 1 << 18   # values per pass of the int8/int4 quantizer: a 1 MiB scratch that stays in cache


class CodecError(ValueError):
    """Received bytes that do not decode to a valid tensor (wrong length, bad values)."""


def all_finite(x: torch.Tensor) -> bool:
    """No NaN or infinity in x: one reduction pass (min and max propagate NaN, and an infinity is
    an extreme), about a tenth of torch.isfinite(x).all(), which writes a mask of x's size."""
    if x.numel() == 0:
        return True
    lo, hi = torch.aminmax(x)
    return math.isfinite(float(lo)) and math.isfinite(float(hi))


def _check_input(x: torch.Tensor) -> None:
    """Raise ValueError unless x is a finite 1-D contiguous float32 CPU tensor."""
    if x.dim() != 1 or x.dtype != torch.float32 or x.device.type != "cpu" or not x.is_contiguous():
        raise ValueError(
            f"codecs encode 1-D contiguous float32 CPU tensors, got shape {tuple(x.shape)} "
            f"dtype {x.dtype} device {x.device} contiguous={x.is_contiguous()}"
        )
    if not all_finite(x):
        raise ValueError("cannot encode a tensor with non-finite values")


def _f32_bytes(x: torch.Tensor) -> bytes:
    return np.asarray(x.detach().numpy(), dtype=_F32_LE).tobytes()


def _f32_from(data: bytes | memoryview) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(data, dtype=_F32_LE).astype(np.float32))


class Codec(ABC):
    """Encodes a 1-D float32 CPU tensor to bytes and back. Subclasses state their error bound."""

    name: ClassVar[str]
    ERROR_BOUND: ClassVar[str]
    EXACT: ClassVar[bool] = False
    """decode(encode(x)) == x bitwise: an encoder need not decode to learn what it lost (nothing)."""

    @abstractmethod
    def encoded_size(self, numel: int) -> int:
        """Length in bytes of encode(x) for x of numel values."""

    def encode(self, x: torch.Tensor) -> bytes:
        """Bytes for x (finite, 1-D, contiguous, float32, CPU; ValueError otherwise)."""
        _check_input(x)
        return self._encode(x)

    def decode(self, data: bytes, numel: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """A new 1-D float32 tensor of numel values, or `out` (a 1-D contiguous float32 CPU tensor
        of numel values, e.g. a slice of the whole average) written with them; CodecError if data
        is not a valid encoding."""
        if numel < 0:
            raise ValueError(f"numel must be >= 0, got {numel}")
        if out is not None and (out.dim() != 1 or out.dtype != torch.float32 or out.device.type != "cpu"
                                or not out.is_contiguous() or out.numel() != numel):
            raise ValueError(f"decode out=: expected a contiguous 1-D float32 CPU tensor of {numel} values, got "
                             f"shape {tuple(out.shape)} dtype {out.dtype} device {out.device}")
        expected_bytes = self.encoded_size(numel)
        if len(data) != expected_bytes:
            raise CodecError(
                f"{self.name} payload has {len(data)} bytes, expected {expected_bytes} for {numel} values"
            )
        return self._decode(memoryview(data), numel, empty_f32(numel) if out is None else out)

    def encode_view(self, x: torch.Tensor) -> bytes | memoryview:
        """encode(x)'s bytes; a codec whose bytes are x's own memory (fp32 on a little-endian
        machine) returns a read-only view of x instead of a copy: x must then not change while the
        view is in use (a shard of a hand-over delta, a fresh mean)."""
        return self.encode(x)

    def encode_decoded(self, x: torch.Tensor) -> tuple[bytes | memoryview, torch.Tensor]:
        """encode_view(x) and the new tensor its bytes decode to (x itself for an exact codec): what
        the encoder's error feedback needs. A codec may build the decoding while it encodes."""
        payload = self.encode_view(x)
        return payload, x if self.EXACT else self.decode(payload, x.numel())

    def decode_view(self, data: bytearray | memoryview, numel: int) -> torch.Tensor:
        """decode(data, numel); a codec whose bytes are the values themselves (fp32 on a little-endian
        machine) returns a tensor over `data`'s memory instead of a copy (checked the same way):
        `data` must then not change while the tensor is in use."""
        return self.decode(data, numel)

    @abstractmethod
    def _encode(self, x: torch.Tensor) -> bytes: ...

    @abstractmethod
    def _decode(self, data: memoryview, numel: int, out: torch.Tensor) -> torch.Tensor:
        """Writes the values into out and returns it."""


class Fp32Codec(Codec):
    """Raw little-endian float32. Exact: decode(encode(x)) == x bitwise."""

    name = "fp32"
    ERROR_BOUND = "exact"
    EXACT = True

    def encoded_size(self, numel: int) -> int:
        return 4 * numel

    def _encode(self, x: torch.Tensor) -> bytes:
        return _f32_bytes(x)

    def encode_view(self, x: torch.Tensor) -> bytes | memoryview:
        if sys.byteorder != "little":
            return self.encode(x)
        _check_input(x)
        return memoryview(x.detach().numpy()).cast("B").toreadonly()

    def decode_view(self, data: bytearray | memoryview, numel: int) -> torch.Tensor:
        if sys.byteorder != "little" or len(data) != self.encoded_size(numel) or numel == 0:
            return self.decode(data, numel)
        with warnings.catch_warnings():   # a read-only view is fine: the values are only read
            warnings.simplefilter("ignore", UserWarning)
            values = torch.frombuffer(data, dtype=torch.float32)
        self._check_finite(values)
        return values

    def _decode(self, data: memoryview, numel: int, out: torch.Tensor) -> torch.Tensor:
        np.copyto(out.numpy(), np.frombuffer(data, dtype=_F32_LE))
        self._check_finite(out)
        return out

    @staticmethod
    def _check_finite(values: torch.Tensor) -> None:
        if not all_finite(values):
            raise CodecError(f"fp32 payload has {int((~torch.isfinite(values)).sum())} non-finite values")


class _CastCodec(Codec):
    """A round-to-nearest-even cast to a 16-bit float, little-endian. decode widens it back exactly."""

    DTYPE: ClassVar[torch.dtype]

    def encoded_size(self, numel: int) -> int:
        return 2 * numel

    def _cast(self, x: torch.Tensor) -> torch.Tensor:
        """x cast to DTYPE (a new tensor); ValueError where a value overflows it."""
        y = x.to(self.DTYPE)
        if not all_finite(y):
            raise ValueError(f"{self.name} codec: |x| up to {float(x.abs().max()):.3g} overflows {self.name}; "
                             "pick --codec bf16, int8 or fp32")
        return y

    def _encode(self, x: torch.Tensor) -> bytes:
        return self._cast(x).view(torch.int16).numpy().astype("<i2", copy=False).tobytes()

    def encode_view(self, x: torch.Tensor) -> bytes | memoryview:
        """The cast's own memory, read-only (a new tensor nothing else holds), without encode's copy
        of it into bytes."""
        if sys.byteorder != "little":
            return self.encode(x)
        _check_input(x)
        return memoryview(self._cast(x).view(torch.int16).numpy()).cast("B").toreadonly()

    def _decode(self, data: memoryview, numel: int, out: torch.Tensor) -> torch.Tensor:
        if numel and sys.byteorder == "little":
            with warnings.catch_warnings():   # a read-only view is fine: the values are only read
                warnings.simplefilter("ignore", UserWarning)
                raw = torch.frombuffer(data, dtype=torch.int16)   # widened straight from the payload
        else:
            raw = torch.from_numpy(np.frombuffer(data, dtype="<i2").astype(np.int16))
        out.copy_(raw.view(self.DTYPE))
        if not all_finite(out):
            raise CodecError(f"{self.name} payload has {int((~torch.isfinite(out)).sum())} non-finite values")
        return out


class Fp16Codec(_CastCodec):
    name = "fp16"
    DTYPE = torch.float16
    ERROR_BOUND = "|x - decode(encode(x))| <= |x| * 2**-11 + 2**-25 (subnormals); |x| > 65504 is refused"


class Bf16Codec(_CastCodec):
    name = "bf16"
    DTYPE = torch.bfloat16
    ERROR_BOUND = "|x - decode(encode(x))| <= |x| * 2**-8 + 2**-134"


class Int8Codec(Codec):
    """Blockwise absmax int8: per BLOCK values one float32 scale = absmax/Q_MAX, then q = round(x/scale).

    Layout: ceil(numel/BLOCK) little-endian float32 scales, then the q values (_pack); a zero block has
    scale 0 and all-zero q. ERROR_BOUND: the 2**-16 covers the float32 roundings of s, x/s and q*s (seen:
    up to 1.1e-5 * s/2 beyond s/2); 2**-142 matters only for subnormal scales.
    """

    name = "int8"
    ERROR_BOUND = "|x - decode(encode(x))| <= scale * (0.5 + 2**-16) + 2**-142, scale of x's block"
    BLOCK: ClassVar[int] = 256
    Q_MAX: ClassVar[int] = 127
    MAX_SCALE: ClassVar[float] = 2.0**120  # q * scale stays finite for |q| <= Q_MAX

    @classmethod
    def num_blocks(cls, numel: int) -> int:
        return -(-numel // cls.BLOCK)

    def encoded_size(self, numel: int) -> int:
        return 4 * self.num_blocks(numel) + self._q_bytes(numel)

    def _q_bytes(self, numel: int) -> int:
        return numel

    def _pack(self, q: torch.Tensor) -> bytes:
        return q.numpy().tobytes()

    def _unpack(self, data: memoryview, numel: int) -> torch.Tensor:
        q = torch.from_numpy(np.frombuffer(data, dtype=np.int8).copy())
        if numel and int(q.min()) == -128:   # a min pass: a tenth of a (q == -128) mask's
            raise CodecError(f"int8 payload: {int((q == -128).sum())} values are -128, expected [-127, 127]")
        return q

    def _parts(self, numel: int) -> list[tuple[int, int, int]]:
        """(first value, blocks, values per block) of the whole blocks and of the short last one:
        each part is a 2-D view of its values, so scales broadcast over a block without a tensor
        of per-value scales (the same float32 op per value as a per-value tensor would give)."""
        full = numel // self.BLOCK
        parts = [(0, full, self.BLOCK)] if full else []
        if numel % self.BLOCK:
            parts.append((full * self.BLOCK, 1, numel % self.BLOCK))
        return parts

    def _encode(self, x: torch.Tensor) -> bytes:
        numel = x.numel()
        scales = torch.empty(self.num_blocks(numel), dtype=torch.float32)
        q = torch.empty(numel, dtype=torch.int8)
        for start, blocks, size in self._parts(numel):
            xb = x[start:start + blocks * size].view(blocks, size)
            sb = scales[start // self.BLOCK:start // self.BLOCK + blocks]
            # max |x| per block; amax and amin are each a tenth of aminmax(dim=1); abs_: never -0.0
            torch.maximum(xb.amax(dim=1), xb.amin(dim=1).neg_(), out=sb).abs_().div_(float(self.Q_MAX))
            if bool((sb > self.MAX_SCALE).any()):
                raise ValueError(f"{self.name} codec: |x| too large (block scale above {self.MAX_SCALE:.3g})")
            safe = torch.where(sb > 0, sb, torch.ones_like(sb)).unsqueeze(1)
            qb = q[start:start + blocks * size].view(blocks, size)
            rows = max(1, _SLAB // size)   # a slab at a time through one scratch buffer: no shard-sized temporaries
            scratch = torch.empty(min(rows, blocks), size, dtype=torch.float32)
            for r in range(0, blocks, rows):
                s = scratch[:min(rows, blocks - r)]
                torch.div(xb[r:r + rows], safe[r:r + rows], out=s).round_().clamp_(-self.Q_MAX, self.Q_MAX)
                qb[r:r + rows].copy_(s)
        return _f32_bytes(scales) + self._pack(q)

    def _decode(self, data: memoryview, numel: int, out: torch.Tensor) -> torch.Tensor:
        scale_bytes = 4 * self.num_blocks(numel)
        scales = _f32_from(data[:scale_bytes])
        self._check_scales(scales)
        q = self._unpack(data[scale_bytes:], numel)
        for start, blocks, size in self._parts(numel):
            qb, sb = q[start:start + blocks * size].view(blocks, size), scales[start // self.BLOCK:][:blocks]
            zero = sb == 0
            if bool(zero.any()) and bool((qb[zero] != 0).any()):
                raise CodecError(f"{self.name} payload: {int((qb[zero] != 0).sum())} nonzero values in blocks "
                                 "with scale 0")
            # widen, then scale in place: the same float32 product as mul(qb, sb), without its 5x slower
            # mixed-dtype kernel
            out[start:start + blocks * size].view(blocks, size).copy_(qb).mul_(sb.unsqueeze(1))
        return out

    def _check_scales(self, scales: torch.Tensor) -> None:
        bad = ~torch.isfinite(scales) | (scales < 0) | (scales > self.MAX_SCALE)
        if bool(bad.any()):
            block = int(bad.nonzero()[0])
            raise CodecError(
                f"{self.name} payload: block {block} has scale {float(scales[block])!r}, "
                f"expected finite and in [0, {self.MAX_SCALE:.3g}]; {int(bad.sum())} bad scales"
            )


class Int4Codec(Int8Codec):
    """Blockwise absmax int4: per 64 values one float32 scale = absmax/7, q in [-7, 7] stored as q + 8
    in a nibble (0, i.e. -8, is invalid), two values per byte, the even value in the low nibble; an odd
    count ends with a zero high nibble."""

    name = "int4"
    ERROR_BOUND = "|x - decode(encode(x))| <= scale * (0.5 + 2**-16) + 2**-142, scale of x's block"
    BLOCK = 64
    Q_MAX = 7

    def _q_bytes(self, numel: int) -> int:
        return -(-numel // 2)

    def _pack(self, q: torch.Tensor) -> bytes:
        u = (q.numpy() + np.int8(8)).view(np.uint8)   # q in [-7, 7]: no overflow
        if u.size % 2:
            u = np.concatenate([u, np.zeros(1, np.uint8)])
        return (u[0::2] | (u[1::2] << 4)).tobytes()

    def _unpack(self, data: memoryview, numel: int) -> torch.Tensor:
        b = np.frombuffer(data, dtype=np.uint8)
        u = np.empty(2 * b.size, dtype=np.uint8)
        u[0::2], u[1::2] = b & 0x0F, b >> 4
        if numel % 2 and u[-1] != 0:
            raise CodecError("int4 payload: the padding nibble after the last value is not zero")
        q = torch.from_numpy(u[:numel]).view(torch.int8)   # the nibbles, 0 to 15
        if numel and int(q.min()) == 0:
            raise CodecError(f"int4 payload: {int((q == 0).sum())} values are -8, expected [-7, 7]")
        return q.sub_(8)


CODECS: dict[str, Codec] = {codec.name: codec
                             for codec in (Fp32Codec(), Fp16Codec(), Bf16Codec(), Int8Codec(), Int4Codec())}


def get_codec(name: str) -> Codec:
    """The codec called name: one of CODECS, or "sparse:CHUNK:K" (peer.sparse.SparseCodec.from_name;
    peer.config.wire_codec builds it from the run spec); ValueError naming the choices if there is none."""
    if name in CODECS:
        return CODECS[name]
    if name.startswith("sparse:"):
        from peer.sparse import SparseCodec
        return SparseCodec.from_name(name)
    raise ValueError(f"unknown codec {name!r}; choose one of: {', '.join(CODECS)}, sparse:CHUNK:K")
