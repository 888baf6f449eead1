"""Backbone session options: weight pre-packing is off by default (memory) and changes nothing
but float rounding in the taps."""

import numpy as np
import pytest

from mobillm.edge_runtime.backbone import Backbone


def test_prepacking_is_off_by_default_and_the_taps_agree(tiny_engine):
    lean, packed = Backbone(tiny_engine, threads=1), Backbone(tiny_engine, threads=1, prepack=True)
    key = "session.disable_prepacking"
    assert lean.session.get_session_options().get_session_config_entry(key) == "1"
    with pytest.raises(RuntimeError, match="does not have configuration"):  # ORT's default: pre-packing on
        packed.session.get_session_options().get_session_config_entry(key)

    rng = np.random.default_rng(0)
    rows = [rng.integers(4, 200, n) for n in (3, 9, 17, 5)]
    (taps_a, len_a), (taps_b, len_b) = lean.forward(rows), packed.forward(rows)
    assert np.array_equal(len_a, len_b)
    for a, b in zip(taps_a, taps_b):
        assert a.codes.shape == b.codes.shape
        # Another kernel path may round one float differently: a few codes flip at a boundary.
        assert np.mean(a.codes != b.codes) < 0.02
        np.testing.assert_allclose(a.scales.astype(np.float32), b.scales.astype(np.float32), rtol=2e-3, atol=1e-6)
