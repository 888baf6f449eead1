"""--weights gguf: a GGUF's quantized tensors held by ONNX Runtime operators without a second rounding.

A tiny synthetic GGUF (written with the gguf package: Q8_0/Q5_0/Q4_0 through gguf.quants.quantize,
Q4_K/Q6_K/Q2_K as random raw blocks) stands in for the 250 MB real file; the real Gemma 3 270M is
exercised in test_gemma.py (slow)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf", exc_type=ModuleNotFoundError)
ort = pytest.importorskip("onnxruntime", exc_type=ModuleNotFoundError)
onnx = pytest.importorskip("onnx", exc_type=ModuleNotFoundError)

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from mobillm.export import gguf_weights  # noqa: E402

Q = gguf.GGMLQuantizationType
BYTES = {"Q4_K": 144, "Q6_K": 210, "Q2_K": 84}  # bytes per 256-value super-block
F16_AT = {"Q4_K": (0, 2), "Q6_K": (208,), "Q2_K": (80, 82)}  # where each block's fp16 scales sit


def _raw_blocks(rng, type_name: str, rows: int, cols: int) -> np.ndarray:
    """Random raw super-blocks of a k-quant type, with finite, small fp16 scales."""
    raw = rng.integers(0, 256, (rows * cols // 256, BYTES[type_name]), dtype=np.uint8)
    for at in F16_AT[type_name]:
        raw[:, at:at + 2] = (rng.random(len(raw)) * 0.02 + 1e-3).astype(np.float16).view(np.uint8).reshape(-1, 2)
    return raw.reshape(rows, -1)


def _tensors(rng) -> dict[str, tuple[str, np.ndarray, int, int]]:
    """name -> (type, raw bytes as GGUFWriter takes them, rows, cols)."""
    out = {}
    for name, type_name, rows, cols in [("q8", "Q8_0", 48, 64), ("q5", "Q5_0", 32, 64), ("q4", "Q4_0", 16, 64),
                                        ("embd", "Q8_0", 50, 64)]:
        w = rng.standard_normal((rows, cols)).astype(np.float32)
        out[name] = (type_name, gguf.quants.quantize(w, Q[type_name]), rows, cols)
    for name, type_name, rows, cols in [("q4k", "Q4_K", 24, 256), ("q6k", "Q6_K", 16, 256), ("q2k", "Q2_K", 8, 256)]:
        out[name] = (type_name, _raw_blocks(rng, type_name, rows, cols), rows, cols)
    return out


def _write(path: Path, tensors) -> Path:
    writer = gguf.GGUFWriter(str(path), "gemma3")
    for name, (type_name, raw, _, _) in tensors.items():
        writer.add_tensor(name, raw, raw_dtype=Q[type_name])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("type_name,shape", [("Q8_0", (8, 64)), ("Q5_0", (8, 64)), ("Q4_0", (8, 64)),
                                             ("Q4_K", (4, 512)), ("Q6_K", (4, 512))])
def test_unpacked_blocks_reproduce_the_reference_dequantization(type_name, shape):
    rng = np.random.default_rng(1)
    rows, cols = shape
    if type_name in BYTES:
        raw = _raw_blocks(rng, type_name, rows, cols)
    else:
        raw = gguf.quants.quantize(rng.standard_normal(shape).astype(np.float32) * 3, Q[type_name])
    ref = gguf_weights.dequantize(raw, type_name, rows, cols)
    blocks = gguf_weights.unpack(raw, type_name, rows, cols)
    assert blocks.codes.max() < 2 ** blocks.bits
    got = blocks.dequantize()
    if type_name == "Q4_K":  # one fp32 division in the float zero point
        np.testing.assert_allclose(got, ref, rtol=0, atol=4 * np.spacing(np.abs(ref).max()))
    else:
        np.testing.assert_array_equal(got, ref)


def test_q4k_block_with_zero_scale_keeps_its_constant():
    scale = np.array([[0.0, 0.5]], np.float32)
    offset = np.array([[0.25, 0.125]], np.float32)
    codes = np.full((1, 2, 32), 7, np.uint8)
    scales, zp, codes = gguf_weights._float_zero_points(scale, offset, codes)
    w = (codes.astype(np.float32) - zp[..., None]) * scales[..., None]
    np.testing.assert_array_equal(w[0, 0], np.full(32, -0.25, np.float32))
    np.testing.assert_array_equal(w[0, 1], np.full(32, 7 * 0.5 - 0.125, np.float32))


def _graph(tensors) -> onnx.ModelProto:
    """x [B, 64] -> one MatMul per 64-column weight; ids -> Gather of the embedding; the 256-column
    weights read x tiled 4 times. Weights are the GGUF's dequantized values, as a traced graph has them."""
    nodes, inits, outputs = [], [], []
    nodes.append(helper.make_node("Concat", ["x", "x", "x", "x"], ["x4"], axis=1))
    for name, (type_name, raw, rows, cols) in tensors.items():
        w = gguf_weights.dequantize(raw, type_name, rows, cols)
        if name == "embd":
            inits.append(numpy_helper.from_array(w, name))
            nodes.append(helper.make_node("Gather", [name, "ids"], ["y_" + name], axis=0))
        else:
            inits.append(numpy_helper.from_array(np.ascontiguousarray(w.T), name))
            nodes.append(helper.make_node("MatMul", ["x" if cols == 64 else "x4", name], ["y_" + name]))
        outputs.append(helper.make_tensor_value_info("y_" + name, TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 64]),
                                           helper.make_tensor_value_info("ids", TensorProto.INT64, [None])],
                              outputs, initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _run(model, x, ids):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"x": x, "ids": ids})))


def test_graph_runs_the_gguf_codes_and_matches_the_fp32_graph(tmp_path):
    rng = np.random.default_rng(0)
    tensors = _tensors(rng)
    path = _write(tmp_path / "tiny.gguf", tensors)
    model = _graph(tensors)
    x, ids = rng.standard_normal((5, 64)).astype(np.float32), np.array([0, 3, 49, 3], np.int64)
    want = _run(model, x, ids)
    record = gguf_weights.apply(model, path, widen=True, progress=False)
    ops = sorted(n.op_type for n in model.graph.node)
    assert ops.count("MatMulNBits") == 5 and ops.count("GatherBlockQuantized") == 1 and ops.count("MatMul") == 1
    assert record["widened"] == [{"tensor": "q2k", "type": "Q2_K", "stored_as": "fp32"}]
    types = record["types"]
    assert types["Q4_K MatMulNBits"]["bits"] == 4 and types["Q4_K MatMulNBits"]["zero_points"] == "float"
    assert types["Q6_K MatMulNBits"]["block_size"] == 16 and types["Q5_0 MatMulNBits"]["bits"] == 8
    assert types["Q8_0 MatMulNBits"]["tensors"] == 1 and types["Q8_0 GatherBlockQuantized"]["bits"] == 8
    got = _run(model, x, ids)
    for name, ref in want.items():
        exact = name in ("y_embd",)  # a gather copies the exact dequantized rows
        if exact:
            np.testing.assert_array_equal(got[name], ref)
        else:  # the same weights; only the order of fp32 sums differs
            np.testing.assert_allclose(got[name], ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    stored = sum(i.ByteSize() for i in model.graph.initializer)
    assert stored < sum(numpy_helper.to_array(i).nbytes for i in _graph(tensors).graph.initializer) / 2.5


def test_a_type_without_exact_form_exits_2_when_widening_is_off(tmp_path):
    rng = np.random.default_rng(0)
    tensors = _tensors(rng)
    path = _write(tmp_path / "tiny.gguf", tensors)
    with pytest.raises(gguf_weights.GGUFWidening, match=r"q2k has type Q2_K") as err:
        gguf_weights.apply(_graph(tensors), path, widen=False, progress=False)
    assert err.value.exit_code == 2
