"""An engine exported with --tap-formats: the device picks each tap's format per batch in the graph
(bit-identical with the codec), and the bit planner's eps is measured on its taps and cached."""

import json

import numpy as np
import pytest

from mobillm.edge_runtime.backbone import Backbone
from mobillm.edge_runtime.distortion import CACHE_NAME, load_or_measure, make_planner
from mobillm.kernels import codec

pytestmark = pytest.mark.slow  # two engine exports (~30 s)

RUNGS = "int4,nf4,fp8,int8,fp16"
ROWS = [np.array([2, 100, 200, 300, 400]), np.array([2, 600, 700]), np.array([2, 9, 8, 7, 6, 5, 4])]


@pytest.fixture(scope="module")
def switch_engine(tiny_engine_factory):
    # fp16 compute: the quantizers' input is the fp16 tap itself, so the codec can be fed the same values.
    return tiny_engine_factory(quant="fp16", dtype="fp16", tap_formats=RUNGS)


def test_switched_formats_are_bit_identical_with_the_codec(switch_engine):
    bb = Backbone(switch_engine)
    assert bb.manifest.switch_formats == tuple(RUNGS.split(","))
    own, _ = bb.forward(ROWS, keep="tokens")
    n = len(own)
    for fmts in (["int4"] * n, ["nf4", "fp8", "int8", "fp16"][:n], ["fp16"] * n):
        taps, _ = bb.forward(ROWS, keep="tokens", formats=fmts)
        for ref, tap, fmt in zip(own, taps, fmts):
            enc = codec.encode(ref.codes, fmt, ref.spec.block_size)
            assert tap.spec.fmt == fmt
            assert tap.codes.tobytes() == enc.codes.tobytes() and tap.scales.tobytes() == enc.scales.tobytes()
    with pytest.raises(ValueError, match="cannot switch"):
        Backbone(switch_engine).forward(ROWS, formats=["fp5"] * n)


def test_eps_is_measured_on_the_engine_taps_and_cached(switch_engine, tmp_path, caplog):
    bb = Backbone(switch_engine)
    (switch_engine / CACHE_NAME).unlink(missing_ok=True)
    eps, source = load_or_measure(bb, ROWS, ("int4", "nf4", "int8", "fp16"))
    assert source == "measured" and len(eps) == len(bb.manifest.taps)
    assert all(e["int4"] > e["int8"] > e["fp16"] == 0.0 for e in eps)
    cached = json.loads((switch_engine / CACHE_NAME).read_text())
    assert cached["eps"] == eps and cached["key"]["block_size"] == bb.manifest.taps[0].block_size
    assert load_or_measure(bb, ROWS, ("int4", "nf4", "int8", "fp16")) == (eps, "cache")
    assert load_or_measure(bb, ROWS, ("nf4", "int8", "fp16"))[1] == "measured"  # other formats: stale
    planner, in_graph = make_planner(bb, ROWS, "paper", 0.5)
    assert in_graph and planner.ladder == tuple(RUNGS.split(",")) and planner.eps[0]["fp8"] > 0


def test_a_read_only_engine_keeps_eps_in_memory(switch_engine, tmp_path, caplog):
    import shutil

    engine = tmp_path / "engine"
    shutil.copytree(switch_engine, engine)
    shutil.rmtree(engine / CACHE_NAME, ignore_errors=True)
    (engine / CACHE_NAME).unlink(missing_ok=True)
    (engine / CACHE_NAME).mkdir()  # stands in for a folder we may not write (tests run as root)
    eps, source = load_or_measure(Backbone(engine), ROWS, ("nf4", "int8", "fp16"))
    assert source == "measured, not cached" and "keeping it in memory" in caplog.text
    assert eps[0]["nf4"] > eps[0]["int8"]


def test_an_engine_without_fp16_taps_or_switch_falls_back_with_a_notice(tiny_engine, caplog):
    bb = Backbone(tiny_engine)
    planner, in_graph = make_planner(bb, ROWS, "utility", 0.5)
    assert not in_graph and "re-quantizing" in caplog.text and "Gaussian" in caplog.text
