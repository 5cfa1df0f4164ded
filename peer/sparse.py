"""The sparse codec: per chunk of CHUNK values of the flat shard, the K largest by magnitude, each sent as
its index (bit-packed) and a 2-bit value against one float32 scale per chunk. Error feedback (peer.feedback.
ErrorFeedback) carries what is left out into the next round. Pure CPU torch/numpy, vectorised over chunks;
every machine makes the same bytes (ties in magnitude go to the lower index)."""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from peer.codecs import Codec, CodecError, _check_input, _f32_bytes, _f32_from

MAX_CHUNK = 1 << 20
_SLAB = 1 << 18   # values per pass of the selection: a 1 MiB scratch of |x| that stays in cache


def _container(bits: int) -> int:
    """Bytes of the smallest unsigned integer holding `bits` bits (MAX_CHUNK's indices: 20)."""
    return 1 if bits <= 8 else 2 if bits <= 16 else 4


def _pack_bits(values: np.ndarray, bits: int) -> bytes:
    """values (non-negative, < 2**bits) as a little-endian bit stream of `bits` bits each: each
    value's little-endian bytes unpacked to bits (bit i in column i), the first `bits` columns packed
    again, all in uint8 (a tenth of the memory traffic of shifting int64 copies)."""
    size = _container(bits)
    raw = values.astype(f"<u{size}").view(np.uint8).reshape(-1, size)
    matrix = np.unpackbits(raw, axis=1, bitorder="little")
    return np.packbits(matrix[:, :bits], bitorder="little").tobytes()


def _unpack_bits(data: memoryview, count: int, bits: int) -> np.ndarray:
    """The `count` values of `bits` bits each of a _pack_bits stream, as int64."""
    size = _container(bits)
    matrix = np.zeros((count, 8 * size), dtype=np.uint8)
    matrix[:, :bits] = np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=count * bits,
                                     bitorder="little").reshape(count, bits)
    return np.packbits(matrix, axis=1, bitorder="little").view(f"<u{size}").reshape(count).astype(np.int64)


class SparseCodec(Codec):
    """Layout for n values in c = ceil(n / CHUNK) chunks, chunk i holding k_i = min(K, its length) values:
    c little-endian float32 scales (the chunk's largest kept |x|), then sum(k_i) indices within their
    chunk, ascending per chunk, INDEX_BITS = ceil(log2(CHUNK)) bits each, then sum(k_i) 2-bit codes
    (bit 0: sign, bit 1: magnitude scale rather than scale/2), both bit streams little-endian and padded
    to a whole byte. A kept value decodes to ±scale or ±scale/2, every other value to 0."""

    name = "sparse"
    ERROR_BOUND = ("kept values: |x - decode(encode(x))| <= scale/2 * (1 + 2**-20); the others decode to 0: "
                   "|x| <= the chunk's K-th largest |x| <= scale (error feedback carries them on)")

    def __init__(self, chunk: int = 4096, k: int = 64) -> None:
        if not (2 <= chunk <= MAX_CHUNK and 1 <= k <= chunk):
            raise ValueError(f"sparse codec: chunk must be in [2, {MAX_CHUNK}] and k in [1, chunk], "
                             f"got chunk {chunk} k {k}")
        self.chunk, self.k = chunk, k
        self.index_bits = max(1, math.ceil(math.log2(chunk)))
        self.name = f"sparse:{chunk}:{k}"

    @staticmethod
    @functools.lru_cache(maxsize=16)
    def from_name(name: str) -> SparseCodec:
        """SparseCodec for "sparse:CHUNK:K"; ValueError for anything else."""
        parts = name.split(":")
        if len(parts) != 3 or parts[0] != "sparse" or not all(p.isdigit() for p in parts[1:]):
            raise ValueError(f"sparse codec name must be sparse:CHUNK:K, got {name!r}")
        return SparseCodec(int(parts[1]), int(parts[2]))

    def _layout(self, numel: int) -> tuple[int, int, int]:
        """(chunks, kept values, values in the last chunk)."""
        chunks = -(-numel // self.chunk)
        last = numel - (chunks - 1) * self.chunk if chunks else 0
        kept = (chunks - 1) * self.k + min(self.k, last) if chunks else 0
        return chunks, kept, last

    def encoded_size(self, numel: int) -> int:
        chunks, kept, _ = self._layout(numel)
        return 4 * chunks + -(-kept * self.index_bits // 8) + -(-kept * 2 // 8)

    def _select(self, x: torch.Tensor, rows: int, length: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices (ascending per row) and values of the k largest |x| in each row of `length`; of values
        tied in magnitude, the lower index is kept."""
        block = x.view(rows, length)
        if k == length:
            idx = torch.arange(length).expand(rows, length)
            return idx, block
        # float32 bits of |x| order like |x| (an int32 topk is a third faster than a float one). The k + 1
        # largest tell which rows' k largest are a set of their own: where the k-th and the (k+1)-th
        # differ. Only the others need ranking by index: a tie across the cut (zeros, repeated values,
        # the sums of sparse parts an owner re-encodes). A slab of rows at a time goes through one
        # scratch buffer: no state-sized temporary of |x|.
        idx = torch.empty(rows, k, dtype=torch.int64)
        edge = torch.empty(rows, 2, dtype=torch.int32)   # per row, the k-th and (k+1)-th largest |x| bits
        step = max(1, _SLAB // length)
        scratch = torch.empty(min(step, rows), length, dtype=torch.float32)
        for r in range(0, rows, step):
            mags = torch.abs(block[r:r + step], out=scratch[:min(step, rows - r)]).view(torch.int32)
            top = torch.topk(mags, k + 1, dim=1, sorted=True)
            idx[r:r + step], edge[r:r + step] = top.indices[:, :k], top.values[:, k - 1:]
        tied = (edge[:, 0] == edge[:, 1]).nonzero().flatten()
        if tied.numel():
            idx[tied] = self._select_tied(block[tied], edge[tied, 0], k)
        idx = torch.sort(idx, dim=1).values
        return idx, torch.gather(block, 1, idx)

    @staticmethod
    def _select_tied(block: torch.Tensor, kth: torch.Tensor, k: int) -> torch.Tensor:
        """The k largest |x| per row of block (ascending), whose k-th largest |x| bits are kth (one per
        row): every value above it, then the values equal to it from the lowest index on."""
        mags = torch.abs(block).view(torch.int32)
        kth = kth.view(-1, 1)
        above, equal = mags > kth, mags == kth
        need = k - above.sum(dim=1, keepdim=True, dtype=torch.int32)
        chosen = above | (equal & (equal.cumsum(dim=1, dtype=torch.int32) <= need))
        return chosen.nonzero()[:, 1].view(-1, k)

    def _kept(self, x: torch.Tensor) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
        """The kept indices and values of the full chunks and of a shorter last one (a part each),
        and every chunk's scale (its largest kept |x|)."""
        chunks, _, last = self._layout(x.numel())
        if chunks == 0:
            return [], torch.empty(0)
        full = chunks - 1 if last < self.chunk else chunks
        parts = []
        if full:
            parts.append(self._select(x[: full * self.chunk], full, self.chunk, self.k))
        if full < chunks:
            parts.append(self._select(x[full * self.chunk:], 1, last, min(self.k, last)))
        return parts, torch.cat([v.abs().amax(dim=1) for _, v in parts])

    @staticmethod
    def _signs(v: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per kept value: negative, and big (|v| above 0.75 x its chunk's scale: decodes to the scale,
        else to half of it)."""
        return v < 0, torch.abs(v) > torch.mul(s, 0.75)[:, None]

    def _payload(self, parts: list[tuple[torch.Tensor, torch.Tensor]], scales: torch.Tensor) -> bytes:
        if not parts:
            return b""
        codes = []
        for (_, v), s in zip(parts, scales.split([v.shape[0] for _, v in parts]), strict=True):
            negative, big = self._signs(v, s)
            codes.append((negative.to(torch.int64) | (big.to(torch.int64) << 1)).reshape(-1))
        indices = torch.cat([idx.reshape(-1) for idx, _ in parts])
        return _f32_bytes(scales) + _pack_bits(indices.numpy(), self.index_bits) + _pack_bits(torch.cat(codes).numpy(), 2)

    def _encode(self, x: torch.Tensor) -> bytes:
        return self._payload(*self._kept(x))

    def encode_decoded(self, x: torch.Tensor) -> tuple[bytes, torch.Tensor]:
        """encode(x) and its decoding, built from the values kept (the same float32 ops as _decode),
        without unpacking and checking our own bytes."""
        _check_input(x)
        parts, scales = self._kept(x)
        decoded = torch.zeros(x.numel(), dtype=torch.float32)
        first = 0   # the first chunk of a part
        for (idx, v), s in zip(parts, scales.split([v.shape[0] for _, v in parts]), strict=True):
            negative, big = self._signs(v, s)
            magnitude = torch.where(big, s[:, None], torch.mul(s, 0.5)[:, None])   # as _decode computes it
            positions = idx + (torch.arange(v.shape[0]) + first)[:, None] * self.chunk
            decoded[positions.reshape(-1)] = torch.where(negative, torch.neg(magnitude), magnitude).reshape(-1)
            first += v.shape[0]
        return self._payload(parts, scales), decoded

    def _decode(self, data: memoryview, numel: int, out: torch.Tensor) -> torch.Tensor:
        chunks, kept, last = self._layout(numel)
        out.zero_()
        if chunks == 0:
            return out
        scales = _f32_from(data[: 4 * chunks])
        bad = ~torch.isfinite(scales) | (scales < 0)
        if bool(bad.any()):
            raise CodecError(f"{self.name} payload: {int(bad.sum())} chunk scales are negative or not finite")
        index_bytes = -(-kept * self.index_bits // 8)
        idx = torch.from_numpy(_unpack_bits(data[4 * chunks: 4 * chunks + index_bytes], kept, self.index_bits))
        codes = torch.from_numpy(_unpack_bits(data[4 * chunks + index_bytes:], kept, 2))
        per_chunk = torch.full((chunks,), self.k, dtype=torch.int64)
        per_chunk[-1] = min(self.k, last)
        chunk_of = torch.repeat_interleave(torch.arange(chunks), per_chunk)
        lengths = torch.full((chunks,), self.chunk, dtype=torch.int64)
        lengths[-1] = last
        if bool((idx >= lengths[chunk_of]).any()):
            raise CodecError(f"{self.name} payload: an index lies outside its chunk")
        rising = (idx[1:] > idx[:-1]) | (chunk_of[1:] != chunk_of[:-1])
        if not bool(rising.all()):
            raise CodecError(f"{self.name} payload: indices within a chunk are not strictly ascending")
        s = scales[chunk_of]
        magnitude = torch.where((codes & 2) != 0, s, torch.mul(s, 0.5))
        values = torch.where((codes & 1) != 0, torch.neg(magnitude), magnitude)
        out[chunk_of * self.chunk + idx] = values
        return out
