"""verify on quantized weights: measures that an outlier channel cannot dominate."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mobillm.export.verify import channel_error, probe_agreement, relative_rms


def _stream_with_outlier(rng, tokens=64, width=128):
    ref = rng.standard_normal((tokens, width)).astype(np.float32)
    ref[:, 7] = 1e5 + 10 * rng.standard_normal(tokens)  # a massive activation, as in Gemma 3
    return ref


def test_error_in_ordinary_channels_is_seen_though_the_outlier_hides_it_from_relative_rms():
    rng = np.random.default_rng(0)
    ref = _stream_with_outlier(rng)
    got = ref.copy()
    got[:, np.arange(128) != 7] += 0.5 * rng.standard_normal((64, 127)).astype(np.float32)
    assert relative_rms(got - ref, ref) < 1e-4  # the old measure: "perfect"
    assert channel_error(got, ref) > 0.4
    assert probe_agreement(got, ref) < 0.9
    assert channel_error(ref, ref) == 0 and probe_agreement(ref, ref) == 1.0


def test_a_constant_channel_neither_divides_by_zero_nor_hides():
    rng = np.random.default_rng(1)
    ref = rng.standard_normal((32, 16))
    ref[:, 3] = 2.0
    got = ref.copy()
    got[:, 3] += 1.0
    err = channel_error(got, ref)
    assert math.isfinite(err) and err > 1.0


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_opt_quantized_weights_pass_the_channel_checks(tiny_engine_factory, weights):
    from mobillm.export.verify import verify_engine

    report = verify_engine(tiny_engine_factory(weights=weights))
    assert report.ok, report.table()
    assert all(math.isfinite(c.channel_err) and c.probe_agree > 0.5 for c in report.checks)
    assert "channel_err" in report.table()
