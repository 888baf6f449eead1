"""The native kernels against the reference: the fused C++ op through ONNX Runtime, the same
kernel through its C API on every instruction set, and custom-op graphs against standard-op
graphs. The libraries are built here with CMake (CPU only, cached under build/native); the
tests skip when this machine cannot build them (no cmake or C++ compiler; ONNX Runtime's
headers are vendored in kernels/cpp/third_party)."""

import hashlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings, strategies as st
from onnx import TensorProto, helper

from mobillm.kernels import codec, native, onnx_codec
from mobillm.kernels.conformance import activations, rounding_edges, same_bytes, zero_nonfinite_blocks

QUANT = ["int8", "fp8", "int4", "nf4", "fp4"]


def library_or_skip(name: str):
    try:
        return native.ensure_library(name)
    except native.NativeUnavailable as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def ort_ops():
    return library_or_skip("ort_ops")


@pytest.fixture(scope="module")
def codec_lib():
    library_or_skip("codec")
    return native.load_codec()


@pytest.fixture(scope="module")
def each_isa(codec_lib):
    """The instruction sets this build and processor have (tests loop over them)."""
    isas = [isa for isa in ("avx2+f16c", "sse4.2", "generic") if codec_lib.mobillm_codec_set_isa(isa.encode()) == 0]
    best = isas[0]
    yield isas
    native.set_codec_isa(best)


_SESSIONS = {}


def session(fmt, bs, hidden, rank, dtype, op, lib=None, threads=1):
    key = (fmt, bs, hidden, rank, dtype, op, threads)
    if key not in _SESSIONS:
        input_dtype = TensorProto.FLOAT16 if dtype == np.float16 else TensorProto.FLOAT
        model = onnx_codec.standalone_model(fmt, bs, hidden, rank=rank, input_dtype=input_dtype, op=op)
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        if op == "custom":
            native.register(so, lib)
        _SESSIONS[key] = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return _SESSIONS[key]


def run(x, fmt, bs, op, lib=None, threads=1):
    return session(fmt, bs, x.shape[-1], x.ndim, x.dtype, op, lib, threads).run(None, {"x": x})


def sample(seed, shape, scale, outliers, fp16, zero_blocks):
    return activations(np.random.default_rng(seed), shape, scale, outliers=outliers, fp16=fp16,
                       zero_blocks=zero_blocks)


shapes = st.lists(st.integers(1, 5), min_size=0, max_size=2).flatmap(
    lambda lead: st.integers(1, 300).map(lambda h: tuple(lead) + (h,)))
params = dict(fmt=st.sampled_from(codec.FORMATS), shape=shapes, bs=st.sampled_from([1, 2, 3, 7, 16, 32, 64, 128, 512]),
              seed=st.integers(0, 10_000), scale=st.sampled_from([1e-30, 1e-6, 1e-3, 1.0, 40.0, 3000.0, 1e30]),
              outliers=st.booleans(), fp16=st.booleans(), zero_blocks=st.booleans())


@settings(max_examples=150, deadline=None)
@given(**params)
def test_custom_op_matches_reference(ort_ops, fmt, shape, bs, seed, scale, outliers, fp16, zero_blocks):
    x = sample(seed, shape, scale, outliers, fp16, zero_blocks)
    enc = codec.encode(x, fmt, bs)
    codes, scales = run(x, fmt, bs, "custom", ort_ops)
    assert same_bytes(codes, enc.codes)
    assert same_bytes(scales, enc.scales)


@settings(max_examples=40, deadline=None)
@given(fmt=st.sampled_from(codec.FORMATS), h=st.integers(1, 200), bs=st.sampled_from([1, 3, 16, 64]),
       seed=st.integers(0, 10_000), fp16=st.booleans(), bad=st.sampled_from([np.nan, np.inf, -np.inf]),
       n_bad=st.integers(1, 4))
def test_non_finite_blocks_get_nan_scale_and_zero_codes(ort_ops, fmt, h, bs, seed, fp16, bad, n_bad):
    x = sample(seed, (2, 3, h), 2.0, False, fp16, False)
    rng = np.random.default_rng(seed)
    for _ in range(n_bad):
        x[rng.integers(0, 2), rng.integers(0, 3), rng.integers(0, h)] = bad
    codes, scales = run(x, fmt, bs, "custom", ort_ops)
    if fmt == "fp16":  # codec's saturating cast, without its raise: +-inf -> +-65504, NaN stays NaN
        expected = np.clip(x.astype(np.float32), -codec.FP16_MAX, codec.FP16_MAX).astype(np.float16)
        assert same_bytes(codes, expected)
        return
    assert same_bytes(scales, codec.block_scales(x, fmt, bs))
    assert np.isnan(scales).any()
    assert same_bytes(codes, codec.encode(zero_nonfinite_blocks(x, bs), fmt, bs).codes)


def unpacked(codes, fmt, hidden):
    codes = np.asarray(codes)
    if fmt == "fp16":
        return codes.view(np.uint16)
    return codec.unpack_nibbles(codes, hidden) if codec.BITS[fmt] == 4 else codes


@settings(max_examples=60, deadline=None)
@given(fmt=st.sampled_from(codec.FORMATS), h=st.integers(1, 260), bs=st.sampled_from([1, 4, 7, 32, 64, 128]),
       seed=st.integers(0, 10_000), scale=st.sampled_from([1e-3, 1.0, 40.0, 3000.0]), outliers=st.booleans(),
       fp16=st.booleans(), non_finite=st.booleans())
def test_custom_graph_equals_standard_graph(ort_ops, fmt, h, bs, seed, scale, outliers, fp16, non_finite):
    x = sample(seed, (2, 5, h), scale, outliers, fp16, seed % 3 == 0)
    if non_finite:
        # The standard-op fp8 subgraph cannot take NaN (its exponent Gather fails); Inf it can.
        x[1, 2, seed % h] = np.inf if fmt == "fp8" else np.nan
        x[0, 4, (seed * 7) % h] = -np.inf
    std_codes, std_scales = run(x, fmt, bs, "onnx")
    codes, scales = run(x, fmt, bs, "custom", ort_ops)
    assert same_bytes(scales, std_scales)
    if not non_finite:
        assert same_bytes(codes, std_codes)
        return
    # Codes of a non-finite block are unspecified (its NaN scale decodes them to NaN): compare the rest.
    assert codes.shape == std_codes.shape and codes.dtype == std_codes.dtype
    a, b = unpacked(codes, fmt, h), unpacked(std_codes, fmt, h)
    if fmt == "fp16":
        assert np.array_equal(a, b)
        return
    finite = np.repeat(np.isfinite(scales), bs, axis=-1)[..., :h]
    if codec.BITS[fmt] == 4:
        # The standard-op subgraph packs nibbles with float arithmetic: a NaN code poisons the
        # other nibble of its byte. Compare bytes whose two elements both lie in finite blocks.
        padded = np.concatenate([finite, np.ones(finite.shape[:-1] + (h % 2,), bool)], axis=-1)
        pair = padded[..., 0::2] & padded[..., 1::2]
        finite = np.repeat(pair, 2, axis=-1)[..., :h]
    assert np.array_equal(a[finite], b[finite])


def stand_in_model(taps, op):
    """x [batch, seq, 96] -> three tapped layers of different widths, quantized by `op`."""
    rng = np.random.default_rng(0)
    widths = [96, 160, 33]
    nodes, inits, outputs, prev, prev_w = [], [], [], "x", 96
    for i, w in enumerate(widths):
        weight = f"w{i}"
        inits.append(onnx.numpy_helper.from_array(rng.standard_normal((prev_w, w)).astype(np.float32) * 0.3, weight))
        nodes += [helper.make_node("MatMul", [prev, weight], [f"mm{i}"]), helper.make_node("Tanh", [f"mm{i}"], [f"h{i}"])]
        outputs.append(helper.make_tensor_value_info(f"h{i}", TensorProto.FLOAT, ["batch", "seq", w]))
        prev, prev_w = f"h{i}", w
    graph = helper.make_graph(nodes, "stand_in", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 96])],
                              outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", onnx_codec.OPSET)])
    quant = [{"output": f"h{i}", "fmt": fmt, "block_size": bs, "hidden": widths[i], "codes": f"tap{i}_codes",
              "scales": f"tap{i}_scales"} for i, (fmt, bs) in enumerate(taps)]
    onnx_codec.append_quantizers(model, quant, op=op)
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize("taps", [[("nf4", 64), ("int8", 32), ("fp8", 7)], [("int4", 16), ("fp16", 64), ("nf4", 1)]])
def test_multi_tap_graphs_give_identical_bytes(ort_ops, taps):
    x = np.random.default_rng(1).standard_normal((3, 17, 96)).astype(np.float32)
    results = {}
    for op in ("onnx", "custom"):
        model = stand_in_model(taps, op)
        so = ort.SessionOptions()
        if op == "custom":
            native.register(so, ort_ops)
            assert [n.op_type for n in model.graph.node if n.domain == onnx_codec.CUSTOM_DOMAIN] == [
                onnx_codec.custom_op_type(fmt) for fmt, _ in taps]
            assert any(o.domain == onnx_codec.CUSTOM_DOMAIN for o in model.opset_import)
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        assert [o.name for o in sess.get_outputs()] == [f"tap{i}_{k}" for i in range(3) for k in ("codes", "scales")]
        results[op] = sess.run(None, {"x": x})
    for a, b in zip(results["onnx"], results["custom"]):
        assert same_bytes(a, b)


def test_default_path_is_unchanged():
    model = onnx_codec.standalone_model("nf4", 64, 100)
    assert not any(n.domain == onnx_codec.CUSTOM_DOMAIN for n in model.graph.node)
    assert [o.domain for o in model.opset_import] == [""]
    with pytest.raises(ValueError, match="unknown quantizer op"):
        onnx_codec.standalone_model("nf4", 64, 100, op="trt")


def test_threaded_session_matches_reference(ort_ops):
    # Enough rows for the op to split them over ORT's intra-op threads.
    x = sample(3, (4, 300, 257), 5.0, True, False, False)
    for fmt in codec.FORMATS:
        codes, scales = run(x, fmt, 64, "custom", ort_ops, threads=2)
        enc = codec.encode(x, fmt, 64)
        assert same_bytes(codes, enc.codes) and same_bytes(scales, enc.scales)


def test_bad_attributes_are_reported(ort_ops):
    so = ort.SessionOptions()
    native.register(so, ort_ops)

    def model(**attrs):
        node = helper.make_node("BlockQuantize", ["x"], ["c", "s"], domain="com.mobillm", **attrs)
        graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                                  [helper.make_tensor_value_info("c", TensorProto.UINT8, None),
                                   helper.make_tensor_value_info("s", TensorProto.FLOAT16, None)])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                       helper.make_opsetid("com.mobillm", 1)]).SerializeToString()

    for attrs, message in [({"format": "fp16"}, "BlockQuantizeFp16"), ({"format": "int3"}, "unknown format 'int3'"),
                           ({}, "needs a string attribute 'format'"), ({"format": "nf4", "block_size": 0}, "block_size")]:
        with pytest.raises(Exception, match=message):
            ort.InferenceSession(model(**attrs), so, providers=["CPUExecutionProvider"])


def test_library_info(ort_ops):
    info = native.library_info("ort_ops", ort_ops)
    assert info.sha256 == hashlib.sha256(ort_ops.read_bytes()).hexdigest() and info.size > 0


# --- the kernel's C API, on every instruction set ------------------------------------------


@settings(max_examples=60, deadline=None)
@given(**params)
def test_c_api_matches_reference_on_every_isa(each_isa, fmt, shape, bs, seed, scale, outliers, fp16, zero_blocks):
    x = sample(seed, shape, scale, outliers, fp16, zero_blocks)
    enc = codec.encode(x, fmt, bs)
    for isa in each_isa:
        native.set_codec_isa(isa)
        codes, scales = native.quantize(x, fmt, bs)
        assert same_bytes(codes, enc.codes), isa
        assert same_bytes(scales, enc.scales), isa
        if fmt != "fp16":
            assert same_bytes(native.dequantize(codes, scales, fmt, shape[-1], bs), codec.decode(enc)), isa


@pytest.mark.parametrize("fmt", QUANT)
def test_rounding_boundaries_on_every_isa(each_isa, fmt):
    # The block's absmax is QMAX, so the scale is exactly 1 and y == x: every tie and every
    # neighbour of a tie of the format's grid is checked, negative values and zero included.
    x = rounding_edges(fmt)
    enc = codec.encode(x, fmt, x.shape[-1])
    assert enc.scales[0, 0] == 1.0
    for isa in each_isa:
        native.set_codec_isa(isa)
        codes, scales = native.quantize(x, fmt, x.shape[-1])
        assert same_bytes(codes, enc.codes), isa


@pytest.mark.parametrize("fmt", codec.FORMATS)
def test_every_fp16_value_on_every_isa(each_isa, fmt):
    x = np.arange(1 << 16, dtype=np.uint16).view(np.float16)
    x = x[np.isfinite(x)].reshape(4, -1)
    for bs in (1, 64):
        enc = codec.encode(x, fmt, bs)
        for isa in each_isa:
            native.set_codec_isa(isa)
            for dtype in (np.float16, np.float32):
                codes, scales = native.quantize(x.astype(dtype), fmt, bs)
                assert same_bytes(codes, enc.codes) and same_bytes(scales, enc.scales), (isa, dtype, bs)


def test_fp16_format_saturates_and_keeps_nan(each_isa):
    x = np.array([[1e9, -1e9, 65519.0, 65520.0, -65520.0, np.inf, -np.inf, np.nan, 1e-8, -3e-8]], np.float32)
    expected = np.clip(x, -codec.FP16_MAX, codec.FP16_MAX).astype(np.float16)
    for isa in each_isa:
        native.set_codec_isa(isa)
        for dtype in (np.float32, np.float16):
            codes, _ = native.quantize(x.astype(dtype), "fp16")
            assert same_bytes(codes, expected.astype(np.float16)), (isa, dtype)
