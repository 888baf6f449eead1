"""One MatMul of a Gemma 3 270M MLP shape in every weight format ONNX Runtime offers, on this CPU.

    python -m mobillm.bench.micro.matmul_kernels --m 2048 --k 640 --n 2048 --threads 2 --out docs/runs/matmul_kernels.json

A [M, K] x [K, N] product with random weights: fp32 MatMul; quantize_dynamic int8 per tensor and per
output channel (DynamicQuantizeMatMul / MatMulInteger, uint8 activations per tensor); MatMulNBits
4 and 8 bits, blocks of 32, accuracy_level 0 (fp32 compute) and 4 (int8 compute), with ORT weight
pre-packing off (edge-run's default) and on. Rounds are interleaved; each row's best time counts.
Prints ms and the relative RMS error against the fp32 product, and the 1-minute load average.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _fp32_model(w):
    from onnx import helper, numpy_helper

    k, n = w.shape
    g = helper.make_graph([helper.make_node("MatMul", ["A", "W"], ["Y"])], "g",
                          [helper.make_tensor_value_info("A", 1, [None, k])], [helper.make_tensor_value_info("Y", 1, None)],
                          [numpy_helper.from_array(w, "W")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])


def _nbits_model(w, bits: int, accuracy_level: int, block: int = 32):
    from onnx import helper, numpy_helper

    k, n = w.shape
    wt = w.T.reshape(n, k // block, block)
    half = 2 ** (bits - 1)
    scale = np.abs(wt).max(-1) / (half - 1)
    q = np.clip(np.round(wt / scale[..., None]) + half, 0, 2 * half - 1).astype(np.uint8)
    if bits == 4:
        q = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    node = helper.make_node("MatMulNBits", ["A", "B", "S"], ["Y"], domain="com.microsoft", K=k, N=n, bits=bits,
                            block_size=block, accuracy_level=accuracy_level)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", 1, [None, k])],
                          [helper.make_tensor_value_info("Y", 1, None)],
                          [numpy_helper.from_array(q, "B"), numpy_helper.from_array(scale.astype(np.float32).reshape(-1), "S")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])


def _dynamic_model(w, per_channel: bool):
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as d:
        onnx.save(_fp32_model(w), f"{d}/a.onnx")
        quantize_dynamic(f"{d}/a.onnx", f"{d}/b.onnx", weight_type=QuantType.QInt8, per_channel=per_channel)
        return onnx.load(f"{d}/b.onnx")


def main(argv=None) -> None:
    import logging

    import onnxruntime as ort

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--m", type=int, default=2048, help="rows (batch x tokens)")
    p.add_argument("--k", type=int, default=640)
    p.add_argument("--n", type=int, default=2048)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    logging.getLogger().setLevel(logging.ERROR)
    rng = np.random.default_rng(0)
    w = rng.standard_normal((a.k, a.n)).astype(np.float32)
    x = rng.standard_normal((a.m, a.k)).astype(np.float32)
    ref = x @ w
    models = {"fp32 MatMul": _fp32_model(w), "int8 dynamic per-tensor": _dynamic_model(w, False),
              "int8 dynamic per-channel": _dynamic_model(w, True)}
    for bits in (8, 4):
        for level in (0, 4):
            models[f"MatMulNBits {bits}-bit acc{level}"] = _nbits_model(w, bits, level)
    sessions = {}
    for name, model in models.items():
        for prepack in (False, True):
            so = ort.SessionOptions()
            so.intra_op_num_threads = a.threads
            so.add_session_config_entry("session.disable_prepacking", "0" if prepack else "1")
            sessions[(name, prepack)] = ort.InferenceSession(model.SerializeToString(), so,
                                                             providers=["CPUExecutionProvider"])
    best = {key: float("inf") for key in sessions}
    err = {}
    load = [os.getloadavg()[0]]
    for _ in range(a.rounds):
        for key, s in sessions.items():
            t = time.perf_counter()
            y = s.run(None, {"A": x})[0]
            best[key] = min(best[key], time.perf_counter() - t)
            err[key[0]] = float(np.sqrt(np.mean((y - ref) ** 2) / np.mean(ref ** 2)))
        load.append(os.getloadavg()[0])
    rows = [{"format": name, "prepack": prepack, "ms": 1e3 * best[(name, prepack)], "rel_err": err[name],
             "vs_fp32": best[("fp32 MatMul", prepack)] / best[(name, prepack)]} for name, prepack in sessions]
    for r in rows:
        print(f"{r['format']:<28} prepack {'on ' if r['prepack'] else 'off'} {r['ms']:8.1f} ms  "
              f"{r['vs_fp32']:5.2f}x fp32  rel err {r['rel_err']:.4f}")
    print(f"load average (1 min) during the run: {min(load):.1f}-{max(load):.1f}")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps({"command": "python -m mobillm.bench.micro.matmul_kernels " + " ".join(argv or sys.argv[1:]),
                                     "m": a.m, "k": a.k, "n": a.n, "threads": a.threads, "load_average": load,
                                     "onnxruntime": ort.__version__, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
