"""Codecs: round trips within the stated bounds, strict decoding, error feedback."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from peer.codecs import CODECS, CodecError, Fp32Codec, Int8Codec, all_finite, get_codec
from peer.feedback import ErrorFeedback

pytestmark = pytest.mark.timeout(60)

BLOCK = Int8Codec.BLOCK


def odd_signal(numel: int = 10_007, seed: int = 0) -> torch.Tensor:
    """Normal data with one all-zero block and one block holding a huge outlier."""
    x = torch.randn(numel, generator=torch.Generator().manual_seed(seed))
    x[3 * BLOCK : 4 * BLOCK] = 0.0
    x[5 * BLOCK + 17] = 1e4
    return x


def block_scales(data: bytes, numel: int) -> torch.Tensor:
    """Each value's block scale, read back from an int8 payload."""
    num_blocks = Int8Codec.num_blocks(numel)
    scales = np.frombuffer(data[: 4 * num_blocks], dtype="<f4").astype(np.float32)
    return torch.from_numpy(scales).repeat_interleave(BLOCK)[:numel]


def test_int8_round_trip_within_stated_bound() -> None:
    x, codec = odd_signal(), Int8Codec()
    data = codec.encode(x)
    y = codec.decode(data, x.numel())
    assert y.dtype == torch.float32 and y.shape == x.shape
    scale = block_scales(data, x.numel()).double()
    err = (x.double() - y.double()).abs()
    assert bool((err <= scale * (0.5 + 2**-16) + 2**-142).all())
    assert bool((y[3 * BLOCK : 4 * BLOCK] == 0).all())
    assert float(y[5 * BLOCK + 17]) == pytest.approx(1e4, rel=1e-6)
    # the outlier's block keeps only the outlier; the other blocks keep ~7 bits
    assert float(scale[5 * BLOCK]) == pytest.approx(1e4 / 127, rel=1e-6)
    assert float(err[:BLOCK].max()) < 0.05


def test_int8_layout_and_size() -> None:
    x, codec = odd_signal(), Int8Codec()
    data = codec.encode(x)
    num_blocks = -(-x.numel() // BLOCK)
    assert len(data) == codec.encoded_size(x.numel()) == 4 * num_blocks + x.numel()
    q = np.frombuffer(data[4 * num_blocks :], dtype=np.int8)
    assert q.min() >= -127 and q.max() <= 127
    assert block_scales(data, x.numel())[3 * BLOCK] == 0
    assert len(data) / x.numel() < 1.02


def test_int8_encode_is_deterministic_and_leaves_input() -> None:
    x = odd_signal()
    before = x.clone()
    assert Int8Codec().encode(x) == Int8Codec().encode(x.clone())
    assert torch.equal(x, before)


def test_fp32_is_exact() -> None:
    x, codec = odd_signal(), Fp32Codec()
    data = codec.encode(x)
    assert len(data) == codec.encoded_size(x.numel()) == 4 * x.numel()
    y = codec.decode(data, x.numel())
    assert y.numpy().tobytes() == x.numpy().tobytes()
    assert y.data_ptr() != x.data_ptr()


@pytest.mark.parametrize("name", sorted(CODECS))
@pytest.mark.parametrize("numel", [0, 1, BLOCK - 1, BLOCK, BLOCK + 1])
def test_sizes_match_encodings(name: str, numel: int) -> None:
    codec = get_codec(name)
    x = torch.linspace(-3, 5, numel)
    data = codec.encode(x)
    assert len(data) == codec.encoded_size(numel)
    assert codec.decode(data, numel).shape == (numel,)


@pytest.mark.parametrize("name", sorted(CODECS))
def test_decode_rejects_wrong_length(name: str) -> None:
    codec = get_codec(name)
    data = codec.encode(torch.ones(1000))
    for bad in (data[:-1], data + b"\0"):
        with pytest.raises(CodecError, match=f"{len(bad)} bytes, expected {len(data)} for 1000 values"):
            codec.decode(bad, 1000)


@pytest.mark.parametrize("bad_scale", [float("nan"), float("inf"), -1.0, 2.0**125])
def test_int8_decode_rejects_bad_scale(bad_scale: float) -> None:
    codec = Int8Codec()
    data = bytearray(codec.encode(torch.ones(1000)))
    data[4:8] = np.float32(bad_scale).tobytes()
    with pytest.raises(CodecError, match="block 1 has scale"):
        codec.decode(bytes(data), 1000)


def test_int8_decode_rejects_minus_128_and_stray_values() -> None:
    codec = Int8Codec()
    data = bytearray(codec.encode(torch.ones(600)))
    bad_q = bytes(data[:12]) + b"\x80" + bytes(data[13:])
    with pytest.raises(CodecError, match="-128"):
        codec.decode(bad_q, 600)
    data[0:4] = np.float32(0.0).tobytes()  # block 0 says zero but its values are 127
    with pytest.raises(CodecError, match="256 nonzero values in blocks with scale 0"):
        codec.decode(bytes(data), 600)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_fp32_decode_rejects_non_finite(bad: float) -> None:
    data = bytearray(Fp32Codec().encode(torch.zeros(10)))
    data[8:12] = np.float32(bad).tobytes()
    with pytest.raises(CodecError, match="1 non-finite"):
        Fp32Codec().decode(bytes(data), 10)


@pytest.mark.parametrize("name", sorted(CODECS))
def test_encode_rejects_bad_input(name: str) -> None:
    codec = get_codec(name)
    for bad in (torch.ones(2, 3), torch.ones(4, dtype=torch.float64), torch.ones(8)[::2]):
        with pytest.raises(ValueError, match="1-D contiguous float32 CPU"):
            codec.encode(bad)
    with pytest.raises(ValueError, match="non-finite"):
        codec.encode(torch.tensor([1.0, float("nan")]))


def test_get_codec() -> None:
    assert get_codec("int8") is CODECS["int8"] and get_codec("int8").name == "int8"
    assert get_codec("fp32").name == "fp32"
    with pytest.raises(ValueError, match="unknown codec 'x'; choose one of: fp32, fp16, bf16, int8, int4, sparse:CHUNK:K"):
        get_codec("x")


def test_error_feedback_tracks_the_true_sum() -> None:
    codec, ef, numel = Int8Codec(), ErrorFeedback(), 4099
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(numel, generator=gen)
    true_sum = torch.zeros(numel, dtype=torch.float64)
    decoded_sum = torch.zeros(numel, dtype=torch.float64)
    for _ in range(50):
        delta = base + 0.1 * torch.randn(numel, generator=gen)
        target = ef.compensate(0, delta, numel)
        decoded = codec.decode(codec.encode(target), delta.numel())
        ef.update(0, target, decoded, numel)
        true_sum += delta.double()
        decoded_sum += decoded.double()
    residual = ef.residual()
    assert residual is not None
    torch.testing.assert_close(true_sum - decoded_sum, residual.double(), rtol=0, atol=1e-4)
    # without feedback the error would grow with the rounds; with it, it stays one encode's worth
    assert float((true_sum - decoded_sum).abs().max()) < 0.05


def test_error_feedback_leaves_residual_unless_updated() -> None:
    ef = ErrorFeedback()
    x = torch.tensor([1.0, 2.0, 3.0])
    assert ef.compensate(1, x, 5) is x and ef.residual() is None
    ef.update(1, x, torch.tensor([0.5, 2.0, 2.0]), 5)  # allocated lazily: zeros of the model's numel
    assert torch.equal(ef.residual(), torch.tensor([0.0, 0.5, 0.0, 1.0, 0.0]))
    kept = ef.residual()
    target = ef.compensate(1, x, 5)
    assert torch.equal(target, torch.tensor([1.5, 2.0, 4.0]))
    assert torch.equal(x, torch.tensor([1.0, 2.0, 3.0]))  # never mutated
    assert torch.equal(ef.residual(), kept)  # the round rejected it: no update
    ef.clear()
    assert ef.residual() is None


def test_error_feedback_refuses_slices_outside_the_model() -> None:
    ef = ErrorFeedback()
    with pytest.raises(ValueError, match=r"slice \[3, 6\) of a 5-value model"):
        ef.compensate(3, torch.ones(3), 5)
    ef.update(0, torch.ones(2), torch.zeros(2), 5)
    with pytest.raises(ValueError, match="the residual has 5 values, the model 6"):
        ef.compensate(0, torch.ones(2), 6)
    with pytest.raises(ValueError, match="shapes differ"):
        ef.update(0, torch.ones(2), torch.zeros(3), 5)


def test_error_feedback_state_dict_round_trip() -> None:
    ef = ErrorFeedback()
    assert ef.state_dict() == {}
    ef.update(0, torch.tensor([1.0, 2.0]), torch.tensor([0.5, 0.5]), 3)
    ef.update(2, torch.tensor([3.0]), torch.tensor([3.0]), 3)
    state = ef.state_dict()
    assert list(state) == ["residual"]
    state["residual"].zero_()  # a copy: the live residual is untouched
    assert torch.equal(ef.residual(), torch.tensor([0.5, 1.5, 0.0]))
    other = ErrorFeedback()
    other.load_state_dict(ef.state_dict(), numel=3)
    assert torch.equal(other.residual(), torch.tensor([0.5, 1.5, 0.0]))
    other.load_state_dict({})
    assert other.residual() is None


@pytest.mark.parametrize("state, match", [
    ({"residual": torch.ones(3, dtype=torch.float64)}, "1-D float32 tensor, got torch.float64"),
    ({"residual": torch.ones(3, 1)}, r"1-D float32 tensor, got torch.float32 shape \(3, 1\)"),
    ({"residual": [1.0, 2.0, 3.0]}, "1-D float32 tensor, got list"),
    ({"residual": torch.ones(4)}, r"4 values, expected 3 \(the model's size\)"),
    ({"residual": torch.tensor([1.0, float("nan"), 0.0])}, "1 non-finite values"),
    ({(0, 3): torch.ones(3)}, "got keys \\['\\(0, 3\\)'\\]"),
])
def test_error_feedback_load_validates(state: dict, match: str) -> None:
    ef = ErrorFeedback()
    with pytest.raises(ValueError, match=match):
        ef.load_state_dict(state, numel=3)
    assert ef.residual() is None  # nothing half-loaded


def test_error_feedback_load_checks_the_size_of_the_residual_held() -> None:
    ef = ErrorFeedback()
    ef.update(0, torch.ones(2), torch.zeros(2), 3)
    with pytest.raises(ValueError, match="2 values, expected 3"):
        ef.load_state_dict({"residual": torch.ones(2)})


@pytest.mark.parametrize("name", ["fp32", "int8"])
def test_decode_into_a_slice_gives_the_bytes_of_a_new_tensor(name: str) -> None:
    """decode(..., out=) (a slice of the whole average, as members and replay use it) writes the
    same bytes as a plain decode, touches nothing outside the slice, and refuses a wrong out."""
    codec = get_codec(name)
    x = torch.randn(1000, generator=torch.Generator().manual_seed(5)) * 3
    data = codec.encode(x)
    whole = torch.full((1200,), 7.0)
    got = codec.decode(data, 1000, whole[100:1100])
    assert got.data_ptr() == whole[100:].data_ptr()
    assert whole[100:1100].numpy().tobytes() == codec.decode(data, 1000).numpy().tobytes()
    assert torch.equal(whole[:100], torch.full((100,), 7.0)) and torch.equal(whole[1100:], torch.full((100,), 7.0))
    with pytest.raises(ValueError, match="decode out="):
        codec.decode(data, 1000, torch.empty(999))
    with pytest.raises(ValueError, match="decode out="):
        codec.decode(data, 1000, torch.empty(2000)[::2])
    if codec.EXACT:   # the encoder takes the target itself as its decoding (allreduce.encode_shards)
        assert codec.decode(data, 1000).numpy().tobytes() == x.numpy().tobytes()


@pytest.mark.parametrize("numel", [1, 2, 7, 255, 100_003])
def test_all_finite_finds_every_nan_and_infinity(numel: int) -> None:
    """The one-pass check every codec runs agrees with the mask check, wherever the bad value is."""
    g = torch.Generator().manual_seed(numel)
    assert all_finite(torch.randn(numel, generator=g).mul_(3e38).clamp_(-3.4e38, 3.4e38))
    assert all_finite(torch.empty(0))
    for bad in (float("nan"), float("inf"), float("-inf")):
        for pos in {0, numel // 2, numel - 1}:
            x = torch.randn(numel, generator=g)
            x[pos] = bad
            assert not all_finite(x) and not bool(torch.isfinite(x).all()), (bad, pos)


# sha256 prefixes of each codec's payload for one fixed input, from the encoders as first released:
# peers of different versions in one swarm must keep making the same bytes (a faster encoder too)
PAYLOADS = {"fp32": "5dd4b2bfd2b0a400", "fp16": "ec076bce54933b90", "bf16": "c1c6fd067a46447c",
            "int8": "5e4851b16855766a", "int4": "3594a562a71edcd2", "sparse:4096:64": "71ded35f17817682"}


@pytest.mark.parametrize("name", sorted(PAYLOADS))
def test_payload_bytes_stay_the_same_across_versions(name: str) -> None:
    g = torch.Generator().manual_seed(9)
    x = torch.cat([torch.randn(5000, generator=g), torch.randn(3001, generator=g) ** 3, torch.zeros(300)])
    assert hashlib.sha256(get_codec(name).encode(x)).hexdigest()[:16] == PAYLOADS[name]
