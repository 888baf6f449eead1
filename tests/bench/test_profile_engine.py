"""bench/micro/profile_engine.py: ORT's profiler summed by operator type on a tiny engine."""

from __future__ import annotations

from mobillm.bench.micro import profile_engine


def test_int4_time_is_attributed_to_matmulnbits(tiny_engine_factory):
    r = profile_engine.profile(tiny_engine_factory(weights="int4"), batch=2, seq=8, runs=2, threads=1)
    assert r["weights"] == "int4" and r["weight_quant"]["accuracy_level"] == 0  # export/weights.py NBITS_ACCURACY_LEVEL
    assert r["by_op_ms"]["MatMulNBits"] > 0 and abs(sum(r["by_op_share"].values()) - 1) < 1e-6
    assert len(r["wall_ms"]) == 2 and r["kernel_ms"] > 0
