"""Manifest field checks: what a loadable engine may hold."""

import json

import pytest

from mobillm.common.manifest import Manifest, ManifestError
from mobillm.kernels import codec


def edited(tiny_engine, tmp_path, **tap0):
    data = json.loads((tiny_engine / "manifest.json").read_text())
    data["taps"][0].update(tap0)
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    return tmp_path


def test_per_tensor_block_size_loads(tiny_engine, tmp_path):
    # export-backbone --block-size 0 writes block_size 0 (codec.PER_TENSOR): such an engine must load.
    manifest = Manifest.load(edited(tiny_engine, tmp_path, block_size=codec.PER_TENSOR), verify=False)
    assert manifest.taps[0].block_size == 0
    assert manifest.taps[0].bytes_per_token == codec.bytes_per_row(manifest.taps[0].fmt, manifest.taps[0].hidden, 0)


@pytest.mark.parametrize("tap0, says", [({"block_size": -1}, "block_size must be in 0..65535, got -1"),
                                              ({"hidden": 0}, "hidden must be in 1..65536, got 0")])
def test_bad_sizes_refused(tiny_engine, tmp_path, tap0, says):
    with pytest.raises(ManifestError, match=says):
        Manifest.load(edited(tiny_engine, tmp_path, **tap0), verify=False)
