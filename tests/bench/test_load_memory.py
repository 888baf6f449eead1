"""bench/micro/load_memory.py: every way of opening an engine runs in its own process and reports numbers;
an engine whose weights sit inside its graph file is measured mapped through a copy."""

import json
import shutil

import onnx
import pytest

from mobillm.bench.micro import load_memory


@pytest.mark.slow  # five fresh processes
def test_every_variant_is_measured_and_an_inline_engine_is_mapped_through_a_copy(tiny_engine, tmp_path):
    inline = tmp_path / "inline"
    shutil.copytree(tiny_engine, inline)
    model = onnx.load(str(inline / "backbone.onnx"))  # the weights back inside the graph file, as engines were
    (inline / "backbone.onnx.data").unlink()
    onnx.save_model(model, str(inline / "backbone.onnx"))
    manifest = json.loads((inline / "manifest.json").read_text())
    manifest["external_data"] = None
    (inline / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "load.json"
    assert load_memory.main([str(inline), "--batch", "2", "--seq", "8", "--steps", "1", "--threads", "1",
                             "--vocab", "1000", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == load_memory.VARIANTS
    assert all("error" not in r and r["peak_mb"] > 0 and r["peak_load_mb"] >= r["loaded_mb"] * 0.99 for r in rows)
    assert all(r["s_per_batch"] > 0 for r in rows if r["variant"] != "tokenizer alone")
    assert not (inline / "backbone.onnx.data").exists()  # the engine itself is left as it was
