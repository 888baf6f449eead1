"""The numpy reference codec: round trips, edge cases, and the documented error bounds."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from mobillm.kernels import codec

QUANT = ["int8", "fp8", "int4", "nf4"]


def rows(seed, shape, scale=1.0, outliers=False):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32) * scale
    if outliers:
        x[..., :: max(1, shape[-1] // 8)] *= 50
    return x


@pytest.mark.parametrize("fmt", codec.FORMATS)
def test_shapes_and_bytes(fmt):
    x = rows(0, (3, 5, 100))
    enc = codec.encode(x, fmt, 32)
    assert enc.codes.shape == (3, 5, codec.code_bytes(fmt, 100) // (2 if fmt == "fp16" else 1))
    nb = 0 if fmt == "fp16" else 4
    assert enc.scales.shape == (3, 5, nb) and enc.scales.dtype == np.float16
    assert enc.nbytes == 15 * codec.bytes_per_row(fmt, 100, 32)
    assert codec.decode(enc).shape == x.shape


def test_nf4_bytes_per_element_at_block_64():
    assert codec.bytes_per_row("nf4", 2048, 64) / 2048 <= 0.54


@pytest.mark.parametrize("fmt,bound", [("int8", 0.01), ("fp8", 0.04), ("int4", 0.13), ("nf4", 0.11), ("fp16", 1e-3)])
def test_error_bounds_gaussian(fmt, bound):
    x = rows(1, (64, 1024))
    assert codec.relative_rms_error(x, fmt, 64) < bound


def test_exact_values_roundtrip():
    # Values already on each grid come back exactly.
    x = np.array([[0.0, 127.0, -127.0, 1.0, -64.0, 3.0]], np.float32)
    assert np.array_equal(codec.decode(codec.encode(x, "int8", 64)), x)
    x = np.array([[-7.0, 7.0, 0.0, 3.0, -1.0]], np.float32)
    assert np.array_equal(codec.decode(codec.encode(x, "int4", 64)), x)
    x = (codec.NF4_TABLE * 2).reshape(1, -1)
    assert np.array_equal(codec.decode(codec.encode(x, "nf4", 64)), x)
    finite = codec.FP8_TABLE[np.isfinite(codec.FP8_TABLE)]
    x = finite[np.abs(finite) <= 448].reshape(1, -1)
    assert np.array_equal(codec.decode(codec.encode(x, "fp8", 1024)), x)


def test_fp8_rounds_to_nearest_even():
    # With absmax 448 the scale is 1: y == x. 1.0625 lies halfway between 1.0 and 1.125.
    x = np.array([[448.0, 1.0625, 1.1875, -1.0625, 0.0009765625, 0.0029296875]], np.float32)
    out = codec.decode(codec.encode(x, "fp8", 64))[0]
    assert out[1] == 1.0 and out[2] == 1.25 and out[3] == -1.0
    assert out[4] == 0.0  # 2^-10: halfway between 0 and the smallest subnormal 2^-9 -> even (0)
    assert out[5] == 0.00390625  # 1.5 * 2^-9 -> 2 * 2^-9


def test_int_ties_go_to_even():
    x = np.array([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5]], np.float32)  # scale = 1
    codes = codec.encode(x, "int8", 64).codes.view(np.int8)[0]
    assert list(codes) == [127, 0, 2, 2, 0, -2]


def test_nf4_ties_take_lower_code():
    t = codec.NF4_THRESHOLDS[9]
    x = np.array([[1.0, t]], np.float32)
    codes = codec.unpack_nibbles(codec.encode(x, "nf4", 64).codes, 2)[0]
    assert codes[1] == 9


def test_zero_block_and_short_last_block():
    x = np.zeros((2, 70), np.float32)
    x[1, 64:] = [1, -2, 3, 0, 0, 5]
    for fmt in QUANT:
        enc = codec.encode(x, fmt, 64)
        assert enc.scales[0].tolist() == [0.0, 0.0]
        dec = codec.decode(enc)
        assert np.array_equal(dec[0], np.zeros(70))
        assert np.allclose(dec[1, 64:], x[1, 64:], atol=0.8)


def test_rows_are_self_contained():
    # Dropping rows (padding) after quantization changes no other row's bytes.
    x = rows(2, (4, 9, 129), outliers=True)
    for fmt in QUANT:
        full = codec.encode(x, fmt, 64)
        part = codec.encode(x[1:3, 2:5], fmt, 64)
        assert np.array_equal(full.codes[1:3, 2:5], part.codes)
        assert np.array_equal(full.scales[1:3, 2:5], part.scales)


def test_odd_rows_pack_a_zero_high_nibble():
    x = rows(3, (2, 7))
    for fmt in ("int4", "nf4"):
        enc = codec.encode(x, fmt, 4)
        assert enc.codes.shape == (2, 4)
        assert np.all(enc.codes[:, -1] >> 4 == 0)


def test_large_values_saturate_not_overflow():
    x = np.array([[1e9, -1e9, 1.0, 70000.0]], np.float32)
    for fmt in codec.FORMATS:
        dec = codec.decode(codec.encode(x, fmt, 64))
        assert np.isfinite(dec).all()
        assert np.abs(dec).max() <= 65504 * codec.QMAX.get(fmt, 1.0)


def test_denormal_inputs():
    x = np.full((1, 64), 1e-40, np.float32)  # fp32 denormals: scale underflows to 0 -> all zero
    for fmt in QUANT:
        enc = codec.encode(x, fmt, 64)
        assert enc.scales[0, 0] == 0 and np.array_equal(codec.decode(enc), np.zeros_like(x))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_is_an_error_naming_the_tap(bad):
    x = rows(4, (2, 3, 64))
    x[1, 2, 5] = bad
    with pytest.raises(codec.NonFiniteActivation, match="tap_7"):
        codec.encode(x, "nf4", 64, name="tap_7")
    assert np.isnan(codec.block_scales(x, "nf4", 64)[1, 2, 0])


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown quant format"):
        codec.encode(np.zeros((1, 4), np.float32), "int3")
    with pytest.raises(TypeError):
        codec.encode(np.zeros((1, 4), np.int32), "int8")
    with pytest.raises(ValueError, match="0 for one scale per tensor"):
        codec.encode(np.zeros((1, 4), np.float32), "int8", -1)


def test_per_tensor_is_per_block_with_the_tensor_absmax():
    # Block size 0: the same codes as one block per row whose absmax is the whole tensor's.
    x = rows(11, (4, 130), scale=2.0, outliers=True)
    for fmt in codec.FORMATS:
        enc = codec.encode(x, fmt, codec.PER_TENSOR)
        if fmt == "fp16":
            assert enc.scales.shape == (4, 0)
            continue
        pinned = x.copy()
        pinned[:, -1] = np.where(np.abs(pinned[:, -1]) < np.abs(x).max(), np.abs(x).max(), pinned[:, -1])
        ref = codec.encode(pinned, fmt, 130)  # every row's absmax set to the tensor's
        assert np.array_equal(enc.scales, ref.scales) and (enc.scales == enc.scales[0, 0]).all()
        assert np.array_equal(codec.unpack_nibbles(enc.codes, 130)[:, :-1] if codec.BITS[fmt] == 4 else enc.codes[:, :-1],
                              codec.unpack_nibbles(ref.codes, 130)[:, :-1] if codec.BITS[fmt] == 4 else ref.codes[:, :-1])
        assert codec.bytes_per_row(fmt, 130, codec.PER_TENSOR) == codec.code_bytes(fmt, 130)


@settings(max_examples=60, deadline=None)
@given(fmt=st.sampled_from(codec.FORMATS), h=st.integers(1, 300), bs=st.sampled_from([1, 2, 3, 16, 32, 64, 128]),
       seed=st.integers(0, 2**16), fp16=st.booleans(), outliers=st.booleans())
def test_decode_is_within_half_a_step(fmt, h, bs, seed, fp16, outliers):
    x = rows(seed, (3, h), scale=3.0, outliers=outliers)
    if fp16:
        x = x.astype(np.float16)
    enc = codec.encode(x, fmt, bs)
    dec = codec.decode(enc)
    x32 = x.astype(np.float32)
    if fmt == "fp16":
        assert np.array_equal(dec, x32.astype(np.float16).astype(np.float32))
        return
    scale = np.repeat(enc.scales.astype(np.float32), bs, axis=-1)[..., :h]
    # Largest gap between neighbouring grid values, times the scale, bounds twice the error.
    gap = {"int8": 1.0, "int4": 1.0, "nf4": 0.33, "fp8": 32.0, "fp4": 2.0}[fmt]
    assert np.all(np.abs(dec - x32) <= gap * scale / 2 + 1e-3 * np.abs(x32) + 1e-30)
