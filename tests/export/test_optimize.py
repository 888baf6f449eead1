"""ORT's transformer fusions (export/optimize.py) and the chunked int8 weight quantizer (export/weights.py),
on tiny random engines: verify still passes, the codec nodes are untouched, the manifest records what ran."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch", exc_type=ModuleNotFoundError)
pytest.importorskip("transformers", exc_type=ModuleNotFoundError)

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402

from mobillm.common.manifest import Manifest  # noqa: E402
from mobillm.export import weights  # noqa: E402
from mobillm.export.graph import codec_node_names, gemm_to_matmul, save_onnx  # noqa: E402
from mobillm.export.pipeline import export_engine  # noqa: E402
from mobillm.export.verify import verify_engine  # noqa: E402

from .test_gemma import TINY_GEMMA  # noqa: E402

FUSED_OPS = {"SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "FastGelu"}


def _gemma(tmp_path, fallback_tokenizer_dir, **kwargs):
    out = tmp_path / "engine"
    manifest = export_engine("gemma-3-270m", out, random_init=True, overrides=dict(TINY_GEMMA),
                             tokenizer=fallback_tokenizer_dir, quant="nf4", progress=False, **kwargs)
    return out, manifest, onnx.load(str(out / "backbone.onnx"))


def test_gemma_gets_ort_fusions_by_default_and_still_verifies(tmp_path, fallback_tokenizer_dir):
    out, manifest, model = _gemma(tmp_path, fallback_tokenizer_dir)
    record = manifest.ort_fusions
    assert record["model_type"] == "bert" and record["onnxruntime"] == ort.__version__
    assert FUSED_OPS <= set(record["fused"]) and all(n > 0 for n in record["fused"].values())
    assert FUSED_OPS <= {n.op_type for n in model.graph.node}
    assert Manifest.load(out).ort_fusions == record
    report = verify_engine(out)
    assert report.ok, report.table()


@pytest.mark.slow  # seconds: two exports
def test_no_ort_fusions_keeps_the_graph_as_traced_with_the_same_codec(tmp_path, fallback_tokenizer_dir):
    fused_dir, _, fused = _gemma(tmp_path / "a", fallback_tokenizer_dir)
    plain_dir, manifest, plain = _gemma(tmp_path / "b", fallback_tokenizer_dir, ort_fusions=False)
    assert manifest.ort_fusions is None and manifest.export_options["ort_fusions"] is False
    assert not {n.op_type for n in plain.graph.node} & FUSED_OPS

    def codec(model):
        names = set(codec_node_names(model))
        return [(n.op_type, list(n.input), list(n.output)) for n in model.graph.node if n.name in names]

    assert codec(fused) and codec(fused) == codec(plain)


def test_opt_has_no_matching_fusions_so_nothing_runs(tiny_engine):
    assert Manifest.load(tiny_engine).ort_fusions is None


def _outputs(path, feeds):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


@pytest.mark.slow  # seconds: quantizes a tiny engine twice
def test_int8_in_chunks_gives_the_same_graph_as_one_call(tiny_engine, tmp_path):
    model = onnx.load(str(tiny_engine / "backbone.onnx"))
    exclude = codec_node_names(model)
    gemm_to_matmul(model)
    src = tmp_path / "stage" / "backbone.onnx"
    src.parent.mkdir()
    save_onnx(model, src)
    results, counts = [], []
    for name, chunk_bytes in (("one", 1 << 40), ("many", 1)):
        dst = tmp_path / name / "backbone.onnx"
        dst.parent.mkdir()
        with weights._quiet_ort_quantization():
            counts.append(weights.quantize_dynamic_in_chunks(src, dst, ["MatMul", "Gather"], exclude, chunk_bytes))
        quantized = onnx.load(str(dst))
        assert not any(i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 2 and min(i.dims) > 16
                       for i in quantized.graph.initializer), "every weight matrix should be int8"
        assert sorted(codec_node_names(quantized)) == sorted(exclude)
        ids = np.array([[2, 100, 200, 300], [2, 7, 8, 1]], dtype=np.int64)
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        if any(i.name == "tap_rows" for i in quantized.graph.input):  # every position
            feeds["tap_rows"] = np.arange(ids.size, dtype=np.int64)
        results.append(_outputs(dst, feeds))
    assert counts[0] == 1 and counts[1] > 4
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


def test_no_ort_fusions_flag_reaches_the_options():
    from mobillm.export import cli

    assert cli.build_parser().parse_args(["opt-125m", "--out", "x", "--no-ort-fusions"]).ort_fusions is False
    assert cli.build_parser().parse_args(["opt-125m", "--out", "x"]).ort_fusions is True
