"""`--quant-op custom`: the engine holds a standard-op graph and a fused graph sharing one weights
file; the device runs the fused one with its OWN op library, the same bytes, and falls back with a
one-line notice where the library cannot serve it."""

import json
import logging
import shutil

import numpy as np
import onnx
import pytest

from mobillm.common.manifest import Manifest, ManifestError
from mobillm.edge_runtime.backbone import Backbone
from mobillm.edge_runtime.cli import main as edge_main
from mobillm.edge_runtime.session import QuantizerUnavailable
from mobillm.export.cli import main
from mobillm.export.verify import verify_engine
from mobillm.kernels import native, onnx_codec

TEXTS = ("a gripping, funny film", "dull", "A photo of a cat on a mat")


@pytest.fixture(scope="module")
def op_library():
    try:
        return native.ensure_library("ort_ops")
    except native.NativeUnavailable as exc:
        pytest.skip(f"native op library unavailable: {exc}")


def same_taps(a: Backbone, b: Backbone) -> None:
    rows = [a.tokenize((t,), 64)[0] for t in TEXTS]
    (taps_a, len_a), (taps_b, len_b) = a.forward(rows), b.forward(rows)
    assert np.array_equal(len_a, len_b)
    for x, y in zip(taps_a, taps_b):
        assert x.codes.tobytes() == y.codes.tobytes() and x.scales.tobytes() == y.scales.tobytes()


# nf4 + fp32 weights stays in the fast tier; the other combinations (seconds each) are `slow`.
@pytest.mark.parametrize("quant,weights", [("nf4", "fp32")] + [
    pytest.param(q, w, marks=pytest.mark.slow)
    for q, w in (("int8,fp8,int4,fp16", "fp32"), ("nf4", "int4"), ("nf4", "int8"), ("nf4", "fp16"))])
def test_fused_engine_matches_standard_graph(tiny_engine_factory, op_library, quant, weights):
    standard = Backbone(tiny_engine_factory(quant=quant, weights=weights))
    engine = tiny_engine_factory(quant=quant, weights=weights, quant_op="custom")
    fused = Backbone(engine)
    m = fused.manifest
    assert (m.quant_op, m.fused_graph, m.custom_op) == ("custom", "backbone.fused.onnx",
                                                        {"domain": "com.mobillm", "version": native.OP_VERSION})
    assert m.custom_op_library is None and not list(engine.glob("*.so"))  # no binary from the export machine
    assert fused.engine_session.quantizer == "fused" and fused.engine_session.op_library == op_library
    assert Backbone(engine, quantizer="standard").engine_session.graph == m.graph
    same_taps(standard, fused)


def test_both_graphs_share_one_weights_file(tiny_engine_factory):
    engine = tiny_engine_factory(quant_op="custom")
    m = Manifest.load(engine)
    assert m.external_data == "backbone.onnx.data"
    for name, custom_nodes in ((m.graph, 0), (m.fused_graph, len(m.taps))):
        graph = onnx.load(str(engine / name), load_external_data=False)
        assert sum(n.domain == onnx_codec.CUSTOM_DOMAIN for n in graph.graph.node) == custom_nodes
        external = {e.value for i in graph.graph.initializer for e in i.external_data if e.key == "location"}
        assert external == {"backbone.onnx.data"}
    assert (engine / m.fused_graph).stat().st_size < 200_000


def test_missing_or_foreign_library_falls_back_with_one_line(tiny_engine_factory, tmp_path, caplog):
    engine = tiny_engine_factory(quant_op="custom")
    foreign = tmp_path / "libmobillm_ort_ops.so"
    foreign.write_bytes(b"\x7fELF" + bytes(60))  # not a library this machine can load
    for library, why in ((tmp_path / "absent.so", "is not installed here"), (foreign, "does not load on this machine")):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="mobillm.edge"):
            bb = Backbone(engine, op_library=library)
        notices = [r.getMessage() for r in caplog.records]
        assert bb.engine_session.quantizer == "standard" and len(notices) == 1
        assert why in notices[0] and "running the standard-op quantizer" in notices[0] and "\n" not in notices[0]
        with pytest.raises(QuantizerUnavailable, match=why):
            Backbone(engine, op_library=library, quantizer="fused")


def test_unknown_op_version_exits_2_naming_both(tiny_engine_factory, tmp_path, capsys):
    engine = tmp_path / "engine"
    shutil.copytree(tiny_engine_factory(quant_op="custom"), engine)
    data = json.loads((engine / "manifest.json").read_text())
    data["custom_op"]["version"] = 7
    (engine / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=rf"op set version 7; this mobillm knows version {native.OP_VERSION}"):
        Backbone(engine)
    rc = edge_main(["predict", "--engine", str(engine), "--side", str(tmp_path / "side.onnx"), "hello"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "version 7" in err[0] and f"version {native.OP_VERSION}" in err[0]


def test_engine_from_main_with_a_copied_library_still_loads(tiny_engine_factory, op_library, tmp_path, caplog):
    """The layout exported before fused graphs: graph = the fused graph, the library copied in."""
    engine = tmp_path / "legacy"
    shutil.copytree(tiny_engine_factory(quant_op="custom"), engine)
    (engine / "backbone.onnx").unlink()
    (engine / "backbone.fused.onnx").rename(engine / "backbone.onnx")
    shutil.copy2(op_library, engine / op_library.name)
    data = json.loads((engine / "manifest.json").read_text())
    data.update(custom_op_library=op_library.name, fused_graph=None, custom_op=None, files={})
    Manifest.from_dict({k: v for k, v in data.items() if k != "files"}).save(engine)
    with caplog.at_level(logging.WARNING, logger="mobillm.edge"):
        bb = Backbone(engine)
    assert bb.engine_session.op_library == op_library  # the device's own, not the engine's copy
    assert any("using this device's own" in r.getMessage() for r in caplog.records)
    same_taps(Backbone(tiny_engine_factory()), bb)
    bb = Backbone(engine, op_library=tmp_path / "absent.so")  # no library here: the engine's copy, said so
    assert bb.engine_session.op_library == engine / op_library.name
    with pytest.raises(QuantizerUnavailable, match="only the fused"):
        Backbone(engine, quantizer="standard")


def test_verify_checks_the_fused_graph_bytes(tiny_engine_factory, op_library):
    report = verify_engine(tiny_engine_factory(quant_op="custom", weights="int4"))
    assert report.ok and "same bytes as the standard graph" in report.fused_note
    assert "fused graph" in report.table()


def test_trt_without_tensorrt_is_a_clear_exit_2(tmp_path, capsys):
    pytest.importorskip("torch", exc_type=ModuleNotFoundError)
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    rc = main(["opt-125m", "--random-init", "--out", str(tmp_path / "e"), "--trt", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--trt needs TensorRT" in err[0]
    assert not (tmp_path / "e").exists()
