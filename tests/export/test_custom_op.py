"""`--quant-op custom`: the engine carries the fused op library and gives the same bytes as the standard-op graph."""

import numpy as np
import pytest

from mobillm.edge_runtime.backbone import Backbone
from mobillm.export.cli import main
from mobillm.kernels import native


@pytest.mark.parametrize("quant", ["nf4", "int8,fp8,int4,fp16"])
def test_custom_op_engine_matches_standard_graph(tiny_engine_factory, quant):
    try:
        native.ensure_library("ort_ops")
    except native.NativeUnavailable as exc:
        pytest.skip(f"native op library unavailable: {exc}")
    standard = Backbone(tiny_engine_factory(quant=quant))
    custom = Backbone(tiny_engine_factory(quant=quant, quant_op="custom"))
    assert custom.manifest.quant_op == "custom" and custom.manifest.custom_op_library in custom.manifest.files
    rows = [standard.tokenize((t,), 64)[0] for t in ("a gripping, funny film", "dull", "A photo of a cat on a mat")]
    (taps_a, len_a), (taps_b, len_b) = standard.forward(rows), custom.forward(rows)
    assert np.array_equal(len_a, len_b)
    for a, b in zip(taps_a, taps_b):
        assert a.codes.tobytes() == b.codes.tobytes() and a.scales.tobytes() == b.scales.tobytes()


def test_trt_without_tensorrt_is_a_clear_exit_2(tmp_path, capsys):
    pytest.importorskip("torch")
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    rc = main(["opt-125m", "--random-init", "--out", str(tmp_path / "e"), "--trt", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--trt needs TensorRT" in err[0]
    assert not (tmp_path / "e").exists()
