"""The in-graph dequantizer (kernels/onnx_codec.dequantize_subgraph) gives codec.decode_arrays' bits."""

import numpy as np
import onnxruntime as ort
import pytest

pytest.importorskip("onnx", exc_type=ModuleNotFoundError)

from mobillm.kernels import codec, onnx_codec  # noqa: E402


@pytest.mark.parametrize("fmt", codec.FORMATS)
@pytest.mark.parametrize("hidden,block_size", [(64, 64), (70, 32), (33, 16), (48, codec.PER_TENSOR)])
def test_dequantizer_matches_reference_bit_for_bit(fmt, hidden, block_size):
    rng = np.random.default_rng(hidden + block_size)
    x = (rng.standard_normal((9, hidden)) * rng.uniform(0.01, 30, (9, 1))).astype(np.float32)
    x[2, :5] = 0.0
    x[3] = 0.0  # an all-zero block: scale 0
    enc = codec.encode(x, fmt, block_size)
    session = ort.InferenceSession(onnx_codec.standalone_dequantizer(fmt, block_size, hidden).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    codes = enc.codes.view(np.float16).reshape(9, hidden) if fmt == "fp16" else enc.codes
    got = session.run(["values"], {"codes": codes, "scales": enc.scales.reshape(9, -1).astype(np.float16)})[0]
    want = codec.decode_arrays(enc.codes, enc.scales, fmt, hidden, block_size)
    assert got.shape == want.shape == (9, hidden)
    assert got.tobytes() == want.astype(np.float32).tobytes(), f"max diff {np.abs(got - want).max()}"
