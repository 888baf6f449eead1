"""--weights int8's two kernels: `blocks` (MatMulNBits 8-bit, GatherBlockQuantized embedding) and `dynamic`
(quantize_dynamic). On Gemma 3 the blocks kernel keeps fp32 accuracy where dynamic loses a point
(docs/benchmarks.md, issue 27); here: what each writes, that ORT runs it, and the 8-bit table codec."""

from __future__ import annotations

import json

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime", exc_type=ModuleNotFoundError)
onnx = pytest.importorskip("onnx", exc_type=ModuleNotFoundError)

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from mobillm.export import weights  # noqa: E402
from mobillm.export.gguf_weights import Blocks  # noqa: E402
from mobillm.export.options import ExportOptions  # noqa: E402


def test_symmetric_blocks_round_to_within_half_a_step():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((12, 64)).astype(np.float32)
    w[3, 5] = 40.0  # an outlier coarsens only its own block
    w[7, 32:] = 0.0  # an all-zero block keeps scale 0 and decodes to 0
    b = Blocks.symmetric(w, bits=8, block=32)
    assert b.codes.dtype == np.uint8 and b.codes.min() >= 1 and b.codes.max() <= 255
    err = np.abs(b.dequantize() - w).reshape(12, 2, 32)
    assert np.all(err <= b.scales[..., None] / 2 + 1e-6)
    assert np.all(b.dequantize()[7, 32:] == 0)
    assert b.scales[3, 0] > 10 * np.median(b.scales)  # the outlier's block
    assert b.scales[3, 1] < 2 * np.median(b.scales)  # the same row's other block is untouched


def _gather_model(table: np.ndarray):
    g = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["rows"], name="embed", axis=0),
         helper.make_node("Identity", ["rows"], ["out"], name="keep")],
        "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [None])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], [numpy_helper.from_array(table, "table")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])


def test_tables_become_8_bit_blocks_that_ort_gathers_exactly():
    rng = np.random.default_rng(1)
    table = rng.standard_normal((300, 64)).astype(np.float32)
    model = _gather_model(table)
    record = weights.quantize_tables(model, 8, 32, exclude=[])
    assert record == {"quantized": ["table"], "kept_fp32": []}
    assert [n.op_type for n in model.graph.node] == ["GatherBlockQuantized", "Identity"]
    ids = np.array([0, 5, 299, 5], dtype=np.int64)
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"ids": ids})[0]
    ref = Blocks.symmetric(table, 8, 32).dequantize()[ids]
    np.testing.assert_array_equal(got, ref)
    assert np.abs(got - table[ids]).max() <= np.abs(table).max() / 127 / 2 + 1e-6


def test_a_table_the_block_does_not_divide_stays_fp32_and_is_named():
    model = _gather_model(np.ones((200, 48), np.float32))
    assert weights.quantize_tables(model, 8, 32, exclude=[]) == {"quantized": [], "kept_fp32": ["table"]}
    assert model.graph.node[0].op_type == "Gather"


@pytest.mark.parametrize("kernel", ["blocks", pytest.param("dynamic", marks=pytest.mark.slow)])
def test_each_kernel_writes_its_operators_records_itself_and_verifies(tiny_engine_factory, kernel):
    from mobillm.export.verify import verify_engine

    engine = tiny_engine_factory(weights="int8", int8_kernel=kernel)
    manifest = json.loads((engine / "manifest.json").read_text())
    assert manifest["weight_quant"]["kernel"] == kernel
    assert manifest["export_options"]["int8_kernel"] == kernel
    ops = {n.op_type for n in onnx.load(str(engine / "backbone.onnx"), load_external_data=False).graph.node}
    if kernel == "blocks":
        assert {"MatMulNBits", "GatherBlockQuantized"} <= ops and "DynamicQuantizeLinear" not in ops
        assert manifest["weight_quant"]["bits"] == 8 and manifest["weight_quant"]["tables"]["quantized"]
    else:
        assert "DynamicQuantizeLinear" in ops and "MatMulNBits" not in ops
    report = verify_engine(engine)
    assert report.ok, report.table()


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_matmulnbits_engines_give_the_same_taps_with_and_without_weight_prepacking(tiny_engine_factory, fmt):
    """edge-run turns ORT's pre-packing off, a bundle's runtime leaves it on: the engine must not care (at
    accuracy_level 4 ORT's kernel computes in int8 on pre-packed weights only, and 6-7 % of the codes moved)."""
    from mobillm.edge_runtime.backbone import Backbone

    engine = tiny_engine_factory(weights=fmt)
    nodes = onnx.load(str(engine / "backbone.onnx"), load_external_data=False).graph.node
    levels = {next((a.i for a in n.attribute if a.name == "accuracy_level"), 0)  # absent: the default, 0
              for n in nodes if n.op_type == "MatMulNBits"}
    assert levels == {weights.NBITS_ACCURACY_LEVEL} == {0}
    rows = [np.array([2, 17, 99, 45, 300, 8], np.int64), np.array([2, 7, 8], np.int64)]
    off, _ = Backbone(engine, threads=1, prepack=False).forward(rows)
    on, _ = Backbone(engine, threads=1, prepack=True).forward(rows)
    for a, b in zip(off, on):
        np.testing.assert_array_equal(a.codes, b.codes)
        np.testing.assert_array_equal(a.scales, b.scales)


def test_an_int8_engine_from_before_the_option_reexports_as_dynamic():
    old = {"model": "opt-125m", "out": "engine", "weights": "int8"}  # export_options as manifests stored them
    assert ExportOptions.from_dict(old).int8_kernel == "dynamic"
    assert ExportOptions.from_dict({**old, "weights": "int4"}).int8_kernel == "blocks"  # unused for int4
    assert ExportOptions(model="opt-125m", out="engine", weights="int8").int8_kernel == "blocks"


def test_an_unknown_kernel_is_refused():
    from mobillm.export.options import ExportError

    with pytest.raises(ExportError, match="--int8-kernel"):
        ExportOptions(model="opt-125m", out="engine", weights="int8", int8_kernel="fast")
