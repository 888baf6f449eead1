"""Bit identity of the in-graph ONNX form (run by ONNX Runtime) and the torch codec with the reference."""

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import given, settings, strategies as st
from onnx import TensorProto

from mobillm.kernels import codec, onnx_codec
from mobillm.kernels.conformance import rounding_edges

torch = pytest.importorskip("torch", exc_type=ModuleNotFoundError)
from mobillm.kernels import torch_codec  # noqa: E402

_SESSIONS = {}


def ort_encode(x, fmt, bs):
    key = (fmt, bs, x.shape[-1], x.ndim, x.dtype)
    if key not in _SESSIONS:
        dtype = TensorProto.FLOAT16 if x.dtype == np.float16 else TensorProto.FLOAT
        model = onnx_codec.standalone_model(fmt, bs, x.shape[-1], rank=x.ndim, input_dtype=dtype)
        _SESSIONS[key] = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return _SESSIONS[key].run(None, {"x": x})


def same_bytes(a, b):
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    return a.shape == b.shape and a.tobytes() == b.tobytes()


def sample(seed, shape, scale, outliers, fp16):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32) * scale
    if outliers:
        x[..., rng.integers(0, shape[-1], 3)] *= 300
    x[..., : shape[-1] // 5] = 0 if seed % 3 == 0 else x[..., : shape[-1] // 5]
    return np.clip(x, -6e4, 6e4).astype(np.float16) if fp16 else x


shapes = st.tuples(st.integers(1, 3), st.integers(1, 6), st.integers(1, 200))
params = dict(fmt=st.sampled_from(codec.FORMATS), shape=shapes, bs=st.sampled_from([codec.PER_TENSOR, 1, 4, 7, 32, 64, 128]),
              seed=st.integers(0, 10_000), scale=st.sampled_from([1e-3, 1.0, 40.0, 3000.0]),
              outliers=st.booleans(), fp16=st.booleans())


@settings(max_examples=80, deadline=None)
@given(**params)
def test_onnx_matches_reference(fmt, shape, bs, seed, scale, outliers, fp16):
    x = sample(seed, shape, scale, outliers, fp16)
    enc = codec.encode(x, fmt, bs)
    codes, scales = ort_encode(x, fmt, bs)
    assert same_bytes(codes, enc.codes)
    assert same_bytes(scales, enc.scales)


@settings(max_examples=80, deadline=None)
@given(**params)
def test_torch_matches_reference(fmt, shape, bs, seed, scale, outliers, fp16):
    x = sample(seed, shape, scale, outliers, fp16)
    enc = codec.encode(x, fmt, bs)
    codes, scales = torch_codec.encode(torch.from_numpy(x), fmt, bs)
    assert same_bytes(codes.numpy(), enc.codes)
    assert same_bytes(scales.numpy(), enc.scales)
    dec = torch_codec.decode(torch.from_numpy(enc.codes.copy()), torch.from_numpy(enc.scales.copy()), fmt, shape[-1], bs)
    assert same_bytes(dec.numpy(), codec.decode(enc))


def test_onnx_marks_non_finite_blocks_with_nan_scale():
    x = np.ones((1, 2, 128), np.float32)
    x[0, 1, 70] = np.inf
    for fmt in ("int8", "nf4", "fp8", "int4", "fp4"):
        _, scales = ort_encode(x, fmt, 64)
        assert np.isnan(scales[0, 1, 1]) and np.isfinite(scales[0, 1, 0]) and np.isfinite(scales[0, 0]).all()


def test_torch_codec_on_cuda_when_present():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    x = sample(5, (4, 33, 300), 2.0, True, False)
    for fmt in codec.FORMATS:
        enc = codec.encode(x, fmt, 64)
        codes, scales = torch_codec.encode(torch.from_numpy(x).cuda(), fmt, 64)
        assert same_bytes(codes.cpu().numpy(), enc.codes) and same_bytes(scales.cpu().numpy(), enc.scales)


def test_onnx_nan_block_keeps_other_rows_and_nibbles_intact():
    # A NaN inside a tap must not break the session (fp8 indexes tables) or leak into the
    # neighbouring nibble of a 4-bit byte: only its own block's scale says "non-finite".
    x = np.random.default_rng(7).standard_normal((1, 3, 130)).astype(np.float32)
    x[0, 1, 3] = np.nan
    for fmt in ("int8", "fp8", "int4", "nf4", "fp4"):
        codes, scales = ort_encode(x, fmt, 64)
        assert np.isnan(scales[0, 1, 0]) and not np.isnan(scales[0, 1, 1:]).any()
        for row in (0, 2):
            enc = codec.encode(x[:, row], fmt, 64)
            assert same_bytes(codes[:, row], enc.codes) and same_bytes(scales[:, row], enc.scales)
        clean = x.copy()
        clean[0, 1, 3] = 0
        ref = codec.encode(clean[:, 1], fmt, 64).codes.view(np.uint8)
        got = codes[:, 1].view(np.uint8)
        if codec.BITS[fmt] == 4:
            assert got[0, 1] & 0x0F == ref[0, 1] & 0x0F  # element 2 shares a byte with element 3


def fp4_edge_rows() -> np.ndarray:
    """Rows whose absmax is 6, so y = x exactly: every fp4 value, every midpoint (ties), values a
    hair either side of them, zeros of both signs, and a short last block (hidden 67, block 64)."""
    mags = np.concatenate([codec.FP4_MAGNITUDES, codec.FP4_MIDPOINTS])
    near = np.concatenate([np.nextafter(mags, np.float32(0)), np.nextafter(mags, np.float32(7))])
    vals = np.concatenate([mags, near, [0.0, -0.0, 0.1, -0.1, 0.24, -0.26]]).astype(np.float32)
    vals = np.clip(vals, -6, 6)
    row = np.zeros(67, np.float32)
    row[:64] = np.resize(vals, 64)
    row[0], row[64:] = 6.0, [-5.0, -2.5, 6.0]  # short last block: absmax 6, a tie at 5 and at 2.5
    return np.stack([row, -row, row * np.float32(0.5)])[None]


@pytest.mark.parametrize("fmt", ["int8", "fp8", "int4", "nf4", "fp4"])
def test_rounding_edges_match_across_numpy_onnx_torch(fmt):
    x = rounding_edges(fmt)  # scale exactly 1: every tie of the format's grid and its neighbours
    enc = codec.encode(x, fmt, x.shape[-1])
    assert enc.scales[0, 0] == 1.0
    codes, scales = ort_encode(x, fmt, x.shape[-1])
    assert same_bytes(codes, enc.codes) and same_bytes(scales, enc.scales)
    t_codes, t_scales = torch_codec.encode(torch.from_numpy(x), fmt, x.shape[-1])
    assert same_bytes(t_codes.numpy(), enc.codes) and same_bytes(t_scales.numpy(), enc.scales)


def test_fp4_edge_values_match_across_numpy_onnx_torch():
    x = fp4_edge_rows()
    enc = codec.encode(x, "fp4", 64)
    codes = codec.unpack_nibbles(enc.codes, 67)
    # Ties go to the even code: 0.25 -> 0, 0.75 -> 1.0, 1.25 -> 1.0, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4.
    y = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -5.0, -0.25, -0.0, 6.0, -6.0], np.float32)
    assert codec.FP4_TABLE[codec.quantize_codes(y, "fp4")].tolist() == [0, 1, 1, 2, 2, 4, 4, -4, 0, 0, 6, -6]
    assert codec.quantize_codes(np.float32([-0.25, -0.0]), "fp4").tolist() == [0, 0]  # never -0 (code 8)
    assert 8 not in codes
    ort_codes, ort_scales = ort_encode(x, "fp4", 64)
    assert same_bytes(ort_codes, enc.codes) and same_bytes(ort_scales, enc.scales)
    t_codes, t_scales = torch_codec.encode(torch.from_numpy(x), "fp4", 64)
    assert same_bytes(t_codes.numpy(), enc.codes) and same_bytes(t_scales.numpy(), enc.scales)
    dec = torch_codec.decode(torch.from_numpy(enc.codes.copy()), torch.from_numpy(enc.scales.copy()), "fp4", 67, 64)
    assert same_bytes(dec.numpy(), codec.decode(enc))


def test_per_tensor_scale_is_one_scale_for_the_whole_tensor():
    x = sample(3, (2, 5, 70), 2.0, True, False)
    top = np.float32(np.abs(x).max() * 2)
    x[1, 4, 9] = top  # the tensor's absmax, in one row only
    for fmt in ("int8", "fp4", "nf4"):
        enc = codec.encode(x, fmt, codec.PER_TENSOR)
        assert enc.scales.shape == (2, 5, 1)
        assert (enc.scales == np.float16(top / np.float32(codec.QMAX[fmt]))).all()
        assert enc.nbytes == enc.codes.nbytes + 2
        codes, scales = ort_encode(x, fmt, codec.PER_TENSOR)
        assert same_bytes(codes, enc.codes) and same_bytes(scales, enc.scales)
    x[0, 0, 0] = np.inf  # one non-finite element poisons the tensor's scale, in every row
    _, scales = ort_encode(x, "fp4", codec.PER_TENSOR)
    assert np.isnan(scales).all()
    _, t_scales = torch_codec.encode(torch.from_numpy(x), "fp4", codec.PER_TENSOR)
    assert np.isnan(t_scales.numpy()).all()
