"""The 16-bit, int4 and sparse codecs: round trips within the stated bounds on random, heavy-tailed and
constant tensors, strict decoding, the end-to-end bound of a member's and an owner's encoding, error
feedback, and an averaging of four members through the real encode / reduce / commit code."""

from __future__ import annotations

import pytest
import torch

from peer._proto import peer_pb2 as pb
from peer.aggregate import weighted_mean
from peer.codecs import CodecError, Int4Codec, get_codec
from peer.config import ConfigError, RunSpec, validate_spec, wire_codec
from peer.feedback import ErrorFeedback
from peer.net import allreduce as ar
from peer.net.round import make_roster
from peer.sparse import SparseCodec

pytestmark = pytest.mark.timeout(60)

SPARSE = "sparse:4096:64"
LOSSY = ["fp16", "bf16", "int8", "int4", SPARSE]


def signal(kind: str, numel: int = 20_011, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if kind == "normal":
        return torch.randn(numel, generator=gen)
    if kind == "heavy":  # student-t with 1.5 degrees of freedom: a few values thousands of times the rest
        z = torch.randn(numel, generator=gen)
        chi = torch.randn(numel, 2, generator=gen).pow(2).mean(dim=1)
        return (z / chi.sqrt()).clamp(-1e4, 1e4).contiguous()
    return torch.full((numel,), 0.37 if kind == "constant" else 0.0)


def bound(name: str, x: torch.Tensor) -> torch.Tensor:
    """Per value, the most the codec may change x (its ERROR_BOUND, computed from x)."""
    a = x.abs()
    if name == "fp16":
        return a * 2.0**-11 + 2.0**-25
    if name == "bf16":
        return a * 2.0**-8 + 2.0**-134
    if name in ("int8", "int4"):
        codec = get_codec(name)
        n, b = x.numel(), codec.BLOCK
        padded = torch.zeros(-(-n // b) * b)
        padded[:n] = a
        scale = (padded.view(-1, b).amax(dim=1) / codec.Q_MAX).repeat_interleave(b)[:n]
        return scale * (0.5 + 2.0**-16) + 2.0**-142
    codec = get_codec(name)
    n, c = x.numel(), codec.chunk
    padded = torch.zeros(-(-n // c) * c)
    padded[:n] = a
    return padded.view(-1, c).amax(dim=1).repeat_interleave(c)[:n] * (1 + 2.0**-20)


@pytest.mark.parametrize("name", LOSSY)
@pytest.mark.parametrize("kind", ["normal", "heavy", "constant", "zero"])
def test_round_trip_within_the_stated_bound(name: str, kind: str) -> None:
    codec, x = get_codec(name), signal(kind)
    data = codec.encode(x)
    assert len(data) == codec.encoded_size(x.numel())
    y = codec.decode(data, x.numel())
    assert bool(((x - y).abs() <= bound(name, x)).all()), codec.ERROR_BOUND
    assert codec.encode(x) == data, "every machine must make the same bytes"
    if kind == "zero":
        assert not bool(y.any())


@pytest.mark.parametrize("name", ["fp32", *LOSSY])
@pytest.mark.parametrize("numel", [0, 1, 4097])
def test_encode_view_and_encode_decoded_hold_the_bytes_of_encode_and_decode_the_same(name: str, numel: int) -> None:
    """What members and owners send (encode_decoded's payload: encode_view, a view for fp32, fp16 and
    bf16) is encode's bytes; decoding the view (as an owner decodes its own part) and the decoding
    encode_decoded builds for error feedback (sparse: from the values it kept) are decode's values."""
    codec = get_codec(name)
    x = signal("heavy", numel) / 1e3
    x[: numel // 3] = 0.0                     # a run of zeros: ties across sparse's cut, zero int blocks
    data, view = codec.encode(x), codec.encode_view(x)
    assert bytes(view) == data
    decoded = codec.decode(data, numel).view(torch.int32)
    assert torch.equal(codec.decode(view, numel).view(torch.int32), decoded)
    payload, own = codec.encode_decoded(x)
    assert bytes(payload) == data and torch.equal(own.view(torch.int32), decoded)


@pytest.mark.parametrize("name", LOSSY)
@pytest.mark.parametrize("numel", [0, 1, 2, 63, 64, 65, 4095, 4096, 4097, 8192 + 5])
def test_sizes_match_encodings(name: str, numel: int) -> None:
    codec = get_codec(name)
    assert len(codec.encode(torch.randn(numel))) == codec.encoded_size(numel)


def test_sparse_sends_over_100_times_fewer_bytes_than_fp32_by_default() -> None:
    codec = get_codec(wire_codec(RunSpec(codec="sparse")))
    assert codec.name == SPARSE
    numel = 16 << 20
    assert 4 * numel / codec.encoded_size(numel) >= 100


def test_sparse_keeps_the_largest_values_of_each_chunk_with_their_sign() -> None:
    codec = SparseCodec(chunk=16, k=2)
    x = torch.zeros(40)
    x[[3, 9]] = torch.tensor([-5.0, 3.0])          # chunk 0: both kept, 3 < 0.75 * 5 -> scale / 2
    x[[17, 30]] = torch.tensor([1.0, 1.0])         # chunk 1: a tie breaks to the lower index
    x[20] = 1.0
    x[[33, 39]] = torch.tensor([0.5, -2.0])        # the last, shorter chunk
    y = codec.decode(codec.encode(x), 40)
    assert y.nonzero().flatten().tolist() == [3, 9, 17, 20, 33, 39]
    assert y[[3, 9, 17, 20, 33, 39]].tolist() == [-5.0, 2.5, 1.0, 1.0, 1.0, -2.0]


def test_sparse_picks_by_magnitude_then_lower_index_across_many_chunks() -> None:
    """The selection runs in slabs of rows and ranks only rows with a tie across the cut; against a
    plain per-chunk ranking (|x| descending, then index), on chunks with and without such ties."""
    chunk, k = 64, 4
    codec = SparseCodec(chunk=chunk, k=k)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5000 * chunk + 37, generator=gen)   # more rows than one slab, and a short last chunk
    rows = x[:5000 * chunk].view(5000, chunk)
    rows[::7] = 0.0                                    # all tied
    rows[1::7, :10] = 2.5                              # ten tied for four places
    rows[2::7, :3], rows[2::7, 40:42] = 3.0, -2.0      # three clear, then two tied for the fourth
    rows[3::7, 5] = -0.0                               # a lone -0.0 among random values
    y = codec.decode(codec.encode(x), x.numel())
    for start in range(0, x.numel(), chunk):
        part = x[start:start + chunk]
        ranked = sorted(range(part.numel()), key=lambda i: (-abs(float(part[i])), i))[:k]
        kept = sorted(start + i for i in ranked)
        got = (y[start:start + chunk].nonzero().flatten() + start).tolist()
        assert set(got) <= set(kept), f"chunk at {start}: kept {got}, expected among {kept}"
        # a kept value may decode to 0 only when it is 0 (its chunk's scale is 0)
        assert all(float(x[i]) == 0.0 for i in set(kept) - set(got)), f"chunk at {start}"
    assert codec.encode(x) == codec.encode(x.clone())


def test_sparse_decode_rejects_bad_indices_and_scales() -> None:
    codec = SparseCodec(chunk=16, k=2)
    x = torch.arange(1.0, 41.0)
    good = bytearray(codec.encode(x))
    with pytest.raises(CodecError, match="bytes, expected"):
        codec.decode(bytes(good[:-1]), 40)
    bad = bytearray(good)
    bad[0:4] = bytes.fromhex("0000c0ff")  # NaN scale
    with pytest.raises(CodecError, match="scales"):
        codec.decode(bytes(bad), 40)
    bad = bytearray(good)
    bad[12] = 0xFF  # the first indices: 15, 15 ... no longer ascending
    with pytest.raises(CodecError, match="ascending|outside"):
        codec.decode(bytes(bad), 40)
    with pytest.raises(CodecError, match="outside its chunk"):  # last chunk holds 8 values: index 15 is out
        y = torch.zeros(40)
        y[[38, 39]] = 1.0
        data = bytearray(codec.encode(y))
        data[12 + 2] = 0xFF  # the last chunk's two 4-bit indices (bits 16..23) become 15, 15
        codec.decode(bytes(data), 40)


@pytest.mark.parametrize("name", ["int4", "fp16", "bf16"])
def test_decode_rejects_invalid_values(name: str) -> None:
    codec = get_codec(name)
    data = bytearray(codec.encode(torch.randn(130)))
    if name == "int4":
        data[4 * Int4Codec.num_blocks(130)] = 0x00  # two nibbles of -8
        match = "-8"
    else:
        data[0:2] = bytes.fromhex("007c" if name == "fp16" else "807f")  # +inf
        match = "non-finite"
    with pytest.raises(CodecError, match=match):
        codec.decode(bytes(data), 130)


def test_fp16_refuses_values_it_cannot_hold() -> None:
    with pytest.raises(ValueError, match="overflows fp16"):
        get_codec("fp16").encode(torch.tensor([1.0, 1e5]))


def test_spec_validates_the_sparse_settings() -> None:
    validate_spec(RunSpec(codec="sparse", sparse_chunk=1024, sparse_density=0.01))
    assert wire_codec(RunSpec(codec="sparse", sparse_chunk=1024, sparse_density=0.01)) == "sparse:1024:10"
    for bad in (dict(sparse_chunk=8), dict(sparse_density=0.0), dict(sparse_density=1.5),
                dict(sparse_chunk=64, sparse_density=0.001)):
        with pytest.raises(ConfigError, match="sparse"):
            validate_spec(RunSpec(codec="sparse", **bad))


@pytest.mark.parametrize("name", ["int4", SPARSE])
def test_error_feedback_makes_the_applied_sum_follow_the_meant_sum(name: str) -> None:
    codec, ef, numel = get_codec(name), ErrorFeedback(), 8192
    gen = torch.Generator().manual_seed(3)
    meant = torch.zeros(numel, dtype=torch.float64)
    applied = torch.zeros(numel, dtype=torch.float64)
    errors = []
    for r in range(1, 201):
        delta = torch.randn(numel, generator=gen)
        target = ef.compensate(0, delta, numel)
        decoded = codec.decode(codec.encode(target), numel)
        ef.update(0, target, decoded, numel)
        meant += delta.double()
        applied += decoded.double()
        if r in (20, 200):
            errors.append(float((meant - applied).norm() / meant.norm()))
    # what is left behind is one residual, not the sum of 200 rounds' losses: the relative error shrinks
    assert errors[1] < errors[0] / 2, errors


def test_error_feedback_decay_scales_the_residual_it_adds() -> None:
    codec, numel = get_codec(SPARSE), 4096
    x = torch.randn(numel, generator=torch.Generator().manual_seed(5))
    whole, decayed = ErrorFeedback(), ErrorFeedback(decay=0.5)
    for ef in (whole, decayed):
        ef.update(0, x, codec.decode(codec.encode(x), numel), numel)
    residual = whole.residual()
    assert torch.equal(whole.compensate(0, x, numel), torch.add(x, residual))
    assert torch.equal(decayed.compensate(0, x, numel), torch.add(x, torch.mul(residual, 0.5)))
    assert torch.equal(decayed.residual(), residual), "compensating changes no residual"


def sharded_bound(name: str, x: torch.Tensor, bounds: list[int]) -> torch.Tensor:
    """bound() of a tensor encoded shard by shard (blocks and chunks start at each shard's start)."""
    return torch.cat([bound(name, x[a:b].contiguous()) for a, b in zip(bounds[:-1], bounds[1:], strict=True)])


def average(name: str, deltas: dict[str, torch.Tensor], weights: dict[str, float]
            ) -> tuple[dict[str, torch.Tensor], list[int]]:
    """One round through the real member encode, owner reduction and decode: each member's result."""
    codec = get_codec(name)
    numel = next(iter(deltas.values())).numel()
    members = [pb.Member(peer_id=p, address=f"{p}:1", weight=weights[p], samples=1) for p in sorted(deltas)]
    roster = make_roster(0, members[0].peer_id, members, name, numel)
    efs = {p: ErrorFeedback() for p in deltas}
    sent = {p: ar.encode_shards(deltas[p], roster, codec, efs[p]) for p in deltas}
    reduced = []
    for j in range(len(roster.owners)):
        shard = ar.OwnedShard.__new__(ar.OwnedShard)  # only the reduction: no loop, no futures
        shard.roster, shard.index, shard.codec = roster, j, codec
        items = [(weights[p], codec.decode(sent[p][j][0], roster.shard_bounds[j + 1] - roster.shard_bounds[j]))
                 for p in sorted(deltas)]
        payload, _ = shard._reduce_encode(items, ErrorFeedback())
        assert len(payload) == len(sent[roster.owners[j]][j][0]), "the all-gather is as small as a contribution"
        reduced.append(payload)
    return {p: torch.cat([codec.decode(reduced[j], roster.shard_bounds[j + 1] - roster.shard_bounds[j])
                          for j in range(len(reduced))]) for p in deltas}, list(roster.shard_bounds)


@pytest.mark.parametrize("name", ["fp32"] + LOSSY)
def test_averaged_result_matches_the_reference_and_is_bitwise_equal_across_members(name: str) -> None:
    numel = 4 * 4096 + 123
    gen = torch.Generator().manual_seed(7)
    deltas = {p: torch.randn(numel, generator=gen) * 1e-2 for p in ("a", "b", "c", "d")}
    weights = {"a": 1.0, "b": 2.0, "c": 3.0, "d": 0.5}
    results, bounds = average(name, deltas, weights)
    first = results["a"]
    assert all(torch.equal(first, r) for r in results.values())
    exact = weighted_mean([(weights[p], deltas[p]) for p in sorted(deltas)])
    codec = get_codec(name)
    if name == "fp32":
        torch.testing.assert_close(first, exact, rtol=0, atol=1e-9)
        return
    # end-to-end: each member's encoding errs within its bound, the mean of those within the weighted
    # mean of the bounds; the owner's re-encoding of the (denser) mean adds its own bound on top
    member = weighted_mean([(weights[p], sharded_bound(name, deltas[p], bounds)) for p in sorted(deltas)])
    limit = member + sharded_bound(name, exact.abs() + member, bounds) + 1e-7
    assert bool(((first - exact).abs() <= limit).all()), codec.ERROR_BOUND
