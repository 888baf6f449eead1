"""Engines with a `tap_rows` input quantize only the rows that leave the device; the bytes on the
wire are those of an engine without it (the layout of older engines, which still load and run)."""

import json

import numpy as np
import onnxruntime as ort
import pytest

from mobillm.common import wire
from mobillm.edge_runtime.backbone import Backbone, row_indices
from mobillm.edge_runtime.batches import build_batch
from mobillm.kernels import codec, onnx_codec


def test_row_indices():
    lengths = np.array([3, 1, 2])
    assert row_indices(lengths, 3, "pooled").tolist() == [2, 3, 7]
    assert row_indices(lengths, 3, "tokens").tolist() == [0, 1, 2, 3, 6, 7]
    assert row_indices(lengths, 3, "all").tolist() == list(range(9))
    with pytest.raises(ValueError, match="unknown row selection"):
        row_indices(lengths, 3, "some")


@pytest.mark.parametrize("fmt", codec.FORMATS)
def test_gathered_rows_match_the_reference(fmt):
    x = np.random.default_rng(3).standard_normal((3, 5, 70)).astype(np.float32)
    model = onnx_codec.standalone_model(fmt, 32, 70, rows="r")
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    idx = np.array([4, 0, 14, 7], np.int64)
    codes, scales = session.run(None, {"x": x, "r": idx})
    enc = codec.encode(x.reshape(-1, 70)[idx], fmt, 32)
    assert codes.tobytes() == enc.codes.tobytes() and scales.tobytes() == enc.scales.tobytes()
    assert codes.shape == enc.codes.shape


@pytest.mark.parametrize("quant", ["nf4", pytest.param("int8,fp8,int4,fp16", marks=pytest.mark.slow)])
def test_same_wire_bytes_as_an_engine_without_the_row_input(tiny_engine_factory, quant):
    old = Backbone(tiny_engine_factory(quant=quant, tap_rows=False))
    new = Backbone(tiny_engine_factory(quant=quant))
    assert old.manifest.row_input is None and new.manifest.row_input == "tap_rows"
    assert "tap_rows" in {i.name for i in new.session.get_inputs()}
    assert "tap_rows" not in {i.name for i in old.session.get_inputs()}
    rng = np.random.default_rng(1)
    rows = [rng.integers(4, 2000, n) for n in (5, 17, 1, 9, 12)]
    ids, labels = np.arange(len(rows)), np.array([0, 1, 1, 0, 1])
    for mode in ("pooled", "tokens"):
        frames = []
        for bb in (old, new):
            taps, lengths = bb.forward(rows, keep=mode)
            frames.append(wire.batch_frame(build_batch(7, ids, labels, taps, lengths, mode, None)))
        assert frames[0] == frames[1], mode
    # Every position: the same [batch, seq, ...] layout from both engines.
    (a, _), (b, _) = old.forward(rows), new.forward(rows)
    for ta, tb in zip(a, b):
        assert ta.codes.shape == tb.codes.shape == (5, 17, ta.codes.shape[-1])
        assert ta.codes.tobytes() == tb.codes.tobytes() and ta.scales.tobytes() == tb.scales.tobytes()


def test_engine_without_row_input_field_still_loads(tiny_engine_factory, tmp_path):
    """A manifest written before `row_input` existed (no key at all) reads as an every-token engine."""
    import shutil

    src = tiny_engine_factory(tap_rows=False)
    copy = tmp_path / "engine"
    shutil.copytree(src, copy)
    data = json.loads((copy / "manifest.json").read_text())
    data.pop("row_input")
    (copy / "manifest.json").write_text(json.dumps(data))
    bb = Backbone(copy)
    assert bb.manifest.row_input is None
    taps, lengths = bb.forward([np.array([2, 10, 11]), np.array([2, 12])], keep="pooled")
    assert taps[0].codes.shape[0] == 2 and lengths.tolist() == [3, 2]
