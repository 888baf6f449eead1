"""The run-time format switch (export --tap-formats): each format it selects is bit-identical with the
reference codec, and only the selected format's outputs are filled."""

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto

from mobillm.kernels import codec, onnx_codec

FORMATS = list(codec.FORMATS)  # every format, fp4 included
OUT = onnx_codec.switch_outputs(0)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("bs", [32, codec.PER_TENSOR])
def test_every_selected_format_is_bit_identical_with_the_codec(dtype, bs):
    hidden = 70  # a short last block (block 32) and an odd nibble count
    model = onnx_codec.standalone_model("fp16", bs, hidden, rank=2, rows=None, switch=("fmt", FORMATS),
                                        input_dtype=TensorProto.FLOAT16 if dtype == np.float16 else TensorProto.FLOAT)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = (np.random.default_rng(1).standard_normal((9, hidden)) * 3).astype(dtype)
    x[2, :40] = 0  # a zero block
    for k, fmt in enumerate(FORMATS):
        codes, scales, half = sess.run([OUT["codes"], OUT["scales"], OUT["fp16"]], {"x": x, "fmt": np.array([k])})
        ref = codec.encode(x, fmt, bs)
        if fmt == "fp16":
            assert half.dtype == np.float16 and half.tobytes() == ref.codes.tobytes()
            assert codes.size == 0 and scales.size == 0
        else:
            assert codes.dtype == np.uint8 and codes.shape == ref.codes.shape
            assert codes.tobytes() == ref.codes.tobytes() and scales.tobytes() == ref.scales.tobytes()
            assert half.size == 0


def test_the_tap_own_output_is_unchanged_by_the_switch():
    model = onnx_codec.standalone_model("nf4", 64, 128, rank=2, switch=("fmt", FORMATS))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(2).standard_normal((5, 128)).astype(np.float32)
    codes, scales = sess.run(["codes", "scales"], {"x": x, "fmt": np.array([3])})
    ref = codec.encode(x, "nf4", 64)
    assert codes.tobytes() == ref.codes.tobytes() and scales.tobytes() == ref.scales.tobytes()
