"""Does ONNX Runtime compute only the outputs a run fetches? And what does the run-time format switch cost?

Three graphs over one input x [2048, 1024] (fp32), 1 ORT thread, interleaved, best of 5 rounds:
one quantizer per format; all five quantizers as five outputs, fetching one; the --tap-formats
switch (ONNX If per tap) selecting each format. docs/export.md records the result.

    python -m mobillm.bench.micro.format_switch
"""
from __future__ import annotations

import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

from mobillm.kernels import onnx_codec

HIDDEN, ROWS = 1024, 2048
FORMATS = ["int4", "nf4", "fp8", "int8", "fp16"]


def session(model) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def five_outputs():
    """One input, five quantizer branches, each its own pair of graph outputs."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["r", HIDDEN])
    tap = helper.make_tensor_value_info("tap", TensorProto.FLOAT, ["r", HIDDEN])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["tap"])], "q", [x], [tap])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", onnx_codec.OPSET)])
    return onnx_codec.append_quantizers(model, [{"output": "tap", "fmt": f, "block_size": 64, "hidden": HIDDEN,
                                                 "codes": f"{f}_codes", "scales": f"{f}_scales"} for f in FORMATS])


def main() -> None:
    allfive = session(five_outputs())
    switch = session(onnx_codec.standalone_model("fp16", 64, HIDDEN, rank=2, switch=("fmt", FORMATS)))
    single = {f: session(onnx_codec.standalone_model(f, 64, HIDDEN, rank=2)) for f in FORMATS}
    feed = {"x": np.random.default_rng(0).standard_normal((ROWS, HIDDEN)).astype(np.float32)}
    best: dict = {}

    def timed(key, fn) -> None:
        t0 = time.perf_counter()
        fn()
        best[key] = min(best.get(key, 1e9), time.perf_counter() - t0)

    for _ in range(5):  # interleaved rounds, best of 5
        for k, f in enumerate(FORMATS):
            timed(("one", f), lambda: single[f].run(None, feed))
            timed(("switch", f), lambda: switch.run(None, {**feed, "fmt": np.array([k])}))
            timed(("five", f), lambda: allfive.run([f"{f}_codes", f"{f}_scales"], feed))
    print("| format | one quantizer ms | If switch ms | five outputs, fetch one ms |")
    print("|---|---|---|---|")
    for f in FORMATS:
        print(f"| {f} | {best['one', f] * 1e3:.1f} | {best['switch', f] * 1e3:.1f} | {best['five', f] * 1e3:.1f} |")


if __name__ == "__main__":
    main()
