"""Codec throughput on one CPU core, and the cost of quantizing taps inside an ORT forward pass.

Table 1: encode and decode of a [16,128,2048] fp32 tensor (block 64) per format, in GB/s of
fp32 input (encode) or fp32 output (decode), next to numpy.copyto of the same buffer in the
same run. Implementations: the numpy reference, the standard-op ONNX subgraph (ORT), torch on
CPU, the fused C++ kernel through the ORT custom op, and the same kernel through its C API
(ctypes, preallocated outputs). Every implementation produces the same bytes (tests/kernels).

Table 2: forward time of a stand-in ORT graph (MatMul + Tanh layers, every layer tapped)
with fp32 taps, with taps quantized by the standard-op subgraph, and by the custom op
(sessions measured in interleaved rounds, best of each).

ORT and torch run single-threaded (intra_op_num_threads=1, torch.set_num_threads(1)): the
per-core figure. Times are the best of --repeat runs after a warm-up.

    python -m mobillm.bench.micro.codec
    python -m mobillm.bench.micro.codec --repeat 5 --formats nf4,int8 --skip-forward

A column whose implementation is unavailable here (no torch; the custom-op library cannot be
built) makes the script exit 1 after printing what it measured, unless --without names it.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from mobillm.kernels import codec, native, onnx_codec


def best_time(fn, repeat: int) -> float:
    """Best wall time of `repeat` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def session(model: onnx.ModelProto, custom_lib=None) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    if custom_lib is not None:
        native.register(so, custom_lib)
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def codec_table(x: np.ndarray, formats: list[str], bs: int, repeat: int, custom_lib) -> list[str]:
    try:
        import torch
    except ModuleNotFoundError:  # an installed torch that fails to import is an error, not a missing column
        torch = None
        UNMEASURED.append(("torch", "torch is not installed"))
    else:
        from mobillm.kernels import torch_codec
        torch.set_num_threads(1)
    gb = x.nbytes / 1e9
    copy_dst = np.empty_like(x)
    copy_gbs = gb / best_time(lambda: np.copyto(copy_dst, x), repeat)
    rate = lambda seconds: f"{gb / seconds:6.2f}"  # noqa: E731
    lines = [
        "| format | bytes/elem (incl. scales) | numpy enc | numpy dec | ORT in-graph enc | torch enc | torch dec "
        "| C++ custom op enc | C++ raw enc | C++ raw dec | numpy.copyto |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    hidden = x.shape[-1]
    for fmt in formats:
        enc = codec.encode(x, fmt, bs)
        bpe = codec.bytes_per_row(fmt, hidden, bs) / hidden
        np_enc = rate(best_time(lambda: codec.encode(x, fmt, bs), repeat))
        np_dec = rate(best_time(lambda: codec.decode(enc), repeat))
        graph = session(onnx_codec.standalone_model(fmt, bs, hidden, rank=x.ndim))
        ort_enc = rate(best_time(lambda: graph.run(None, {"x": x}), repeat))
        if torch is not None:
            tx, tc, ts = torch.from_numpy(x), torch.from_numpy(enc.codes.copy()), torch.from_numpy(enc.scales.copy())
            t_enc = rate(best_time(lambda: torch_codec.encode(tx, fmt, bs), repeat))
            t_dec = rate(best_time(lambda: torch_codec.decode(tc, ts, fmt, hidden, bs), repeat))
        else:
            t_enc = t_dec = "  n/a"
        if custom_lib is not None:
            custom = session(onnx_codec.standalone_model(fmt, bs, hidden, rank=x.ndim, op="custom"), custom_lib)
            c_enc = rate(best_time(lambda: custom.run(None, {"x": x}), repeat))
        else:
            c_enc = "  n/a"
        out = (np.empty_like(enc.codes), np.empty_like(enc.scales))
        raw_enc = rate(best_time(lambda: native.quantize(x, fmt, bs, out=out), repeat))
        raw_dec = rate(best_time(lambda: native.dequantize(enc.codes, enc.scales, fmt, hidden, bs), repeat))
        lines.append(f"| {fmt} | {bpe:.4f} | {np_enc} | {np_dec} | {ort_enc} | {t_enc} | {t_dec} | {c_enc} | "
                     f"{raw_enc} | {raw_dec} | {copy_gbs:6.2f} |")
        print(lines[-1], flush=True)
    return lines


def stand_in_model(layers: int, hidden: int) -> onnx.ModelProto:
    """x [batch, seq, hidden] -> `layers` x (MatMul hidden x hidden, Tanh); every layer's output is a tap."""
    rng = np.random.default_rng(0)
    nodes, inits, outputs, prev = [], [], [], "x"
    for i in range(layers):
        w = numpy_helper.from_array((rng.standard_normal((hidden, hidden)) / np.sqrt(hidden)).astype(np.float32), f"w{i}")
        inits.append(w)
        nodes += [helper.make_node("MatMul", [prev, f"w{i}"], [f"mm{i}"]), helper.make_node("Tanh", [f"mm{i}"], [f"h{i}"])]
        outputs.append(helper.make_tensor_value_info(f"h{i}", TensorProto.FLOAT, ["batch", "seq", hidden]))
        prev = f"h{i}"
    graph = helper.make_graph(nodes, "stand_in", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", hidden])],
                              outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", onnx_codec.OPSET)])


def forward_table(formats: list[str], bs: int, repeat: int, custom_lib, layers: int, hidden: int,
                  batch: int, seq: int) -> list[str]:
    x = np.random.default_rng(1).standard_normal((batch, seq, hidden)).astype(np.float32)
    sessions = {("fp32", None): session(stand_in_model(layers, hidden))}
    for fmt in formats:
        taps = [{"output": f"h{i}", "fmt": fmt, "block_size": bs, "hidden": hidden, "codes": f"t{i}_codes",
                 "scales": f"t{i}_scales"} for i in range(layers)]
        for op in ("onnx", "custom") if custom_lib is not None else ("onnx",):
            model = onnx_codec.append_quantizers(stand_in_model(layers, hidden), taps, op=op)
            sessions[(fmt, op)] = session(model, custom_lib if op == "custom" else None)
    # Interleaved rounds, best per session: slow drifts of a shared machine hit every variant alike.
    best = {key: float("inf") for key in sessions}
    for sess in sessions.values():
        sess.run(None, {"x": x})
    for _ in range(repeat):
        for key, sess in sessions.items():
            t = time.perf_counter()
            sess.run(None, {"x": x})
            best[key] = min(best[key], time.perf_counter() - t)
    t_base = best[("fp32", None)]
    lines = ["| format | fp32 taps ms | in-graph quantize ms (overhead) | custom op ms (overhead) |", "|---|---|---|---|"]
    for fmt in formats:
        row = [f"| {fmt} | {1e3 * t_base:.1f}"]
        for op in ("onnx", "custom"):
            t = best.get((fmt, op))
            row.append("n/a" if t is None else f"{1e3 * t:.1f} ({100 * (t - t_base) / t_base:+.1f}%)")
        lines.append(" | ".join(row) + " |")
    print("\n".join(lines), flush=True)
    return lines


UNMEASURED: list[tuple[str, str]] = []  # (column, why) asked for that this machine could not measure


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="16,128,2048", help="tensor shape for table 1")
    parser.add_argument("--block-size", type=int, default=codec.DEFAULT_BLOCK_SIZE, help="quantization block size")
    parser.add_argument("--formats", default=",".join(codec.FORMATS), help="comma-separated formats")
    parser.add_argument("--repeat", type=int, default=7, help="timed runs per cell (best is reported)")
    parser.add_argument("--forward-repeat", type=int, default=15, help="interleaved rounds for table 2")
    parser.add_argument("--forward", default="8,1024,4,128",
                        help="stand-in graph for table 2: layers,hidden,batch,seq")
    parser.add_argument("--forward-formats", default="nf4,int8,fp16", help="formats for table 2")
    parser.add_argument("--skip-forward", action="store_true", help="only table 1")
    parser.add_argument("--without", default="", help="comma-separated columns to leave out on purpose: torch, custom "
                        "(otherwise an unavailable one is a failure, exit 1)")
    args = parser.parse_args()

    shape = tuple(int(d) for d in args.shape.split(","))
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    without = set(filter(None, args.without.split(",")))
    custom_lib = None
    try:
        if "custom" not in without:
            custom_lib = native.ensure_library("ort_ops")
    except native.NativeUnavailable as e:
        print(f"custom op unavailable: {e}")
        UNMEASURED.append(("custom", str(e)))
    print(f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} logical cores; "
          f"onnxruntime {ort.__version__}, numpy {np.__version__}; C++ kernel ISA: {native.codec_isa()}")
    print(f"\nTable 1: {list(shape)} fp32, block {args.block_size}, GB/s of fp32 data, single-threaded\n")
    codec_table(x, args.formats.split(","), args.block_size, args.repeat, custom_lib)
    if not args.skip_forward:
        layers, hidden, batch, seq = (int(v) for v in args.forward.split(","))
        print(f"\nTable 2: stand-in forward, {layers} x (MatMul {hidden}x{hidden} + Tanh), x [{batch},{seq},{hidden}], "
              f"{layers} taps, block {args.block_size}, 1 thread\n")
        forward_table(args.forward_formats.split(","), args.block_size, args.forward_repeat, custom_lib, layers, hidden,
                      batch, seq)
    failed = [f"{column} columns: {why}" for column, why in UNMEASURED if column not in without]
    for line in failed:
        print(f"bench/micro/codec.py: not measured: {line}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
