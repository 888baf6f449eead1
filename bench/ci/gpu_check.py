"""GPU check of the native kernels (run by bench/ci/gpu_check.sh on a CUDA machine).

1. The CUDA kernel (libmobillm_cuda_codec.so, through ctypes) against kernels/codec.py, bit
   for bit: every format, fp32 and fp16 input, odd widths, block sizes 1..512, zero blocks,
   outliers, denormals, and NaN/Inf blocks (NaN scale, zero codes).
2. Throughput: the CUDA kernel in GB/s of input against a device-to-device cudaMemcpy of the
   same buffer, for [16,128,2048] (fits in L2) and a 16x larger tensor (DRAM-bound).
3. torch_codec encode/decode on CUDA against the reference (skipped without torch+CUDA).
4. The com.mobillm custom op on ONNX Runtime's CUDA provider (skipped without onnxruntime-gpu).
A skipped check is recorded in gpu_check.json and exits 1 unless --allow-skipped.

Needs python3 and numpy; runs from an editable install, or without one as gpu_check.sh runs it
(its namespace shim on PYTHONPATH).

    python3 -m mobillm.bench.ci.gpu_check --lib build/gpu/lib --out "$OUT"
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import time
import traceback
from pathlib import Path

import numpy as np

from mobillm.bench.paths import ROOT
from mobillm.kernels import codec, conformance

activations, same_bytes = conformance.activations, conformance.same_bytes
first_difference, zero_nonfinite_blocks = conformance.first_difference, conformance.zero_nonfinite_blocks
RESULTS: dict = {"checks": [], "bench": [], "skipped": [], "errors": []}


def log(msg: str) -> None:
    print(msg, flush=True)


def load_cuda_lib(lib_dir: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(lib_dir / "libmobillm_cuda_codec.so"))
    i64, vp, i = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.mobillm_cuda_block_quantize_host.argtypes = [vp, i, i64, i64, i, i64, vp, vp]
    lib.mobillm_cuda_bench.argtypes = [vp, i, i64, i64, i, i64, i, ctypes.POINTER(ctypes.c_float),
                                       ctypes.POINTER(ctypes.c_float)]
    lib.mobillm_cuda_last_error.restype = ctypes.c_char_p
    lib.mobillm_cuda_device_name.restype = ctypes.c_char_p
    return lib


def cuda_encode(lib, x: np.ndarray, fmt: str, bs: int):
    x = np.ascontiguousarray(x)
    h, lead = x.shape[-1], x.shape[:-1]
    if fmt == "fp16":
        codes, scales = np.empty(lead + (h,), np.float16), np.empty(lead + (0,), np.float16)
    else:
        codes = np.empty(lead + (codec.code_bytes(fmt, h),), np.uint8)
        scales = np.empty(lead + (codec.n_blocks(h, bs),), np.float16)
    rows = int(np.prod(lead, dtype=np.int64))
    rc = lib.mobillm_cuda_block_quantize_host(x.ctypes.data, int(x.dtype == np.float16), rows, h, codec.FORMAT_CODES[fmt],
                                              bs, codes.ctypes.data, scales.ctypes.data)
    if rc != 0:
        raise RuntimeError(lib.mobillm_cuda_last_error().decode())
    return codes, scales


def sample(rng, shape, scale, fp16, zero_blocks, outliers):
    return activations(rng, shape, scale, outliers=outliers, fp16=fp16, zero_blocks=zero_blocks)


def check_bit_identity(lib, n_random: int) -> bool:
    rng = np.random.default_rng(0)
    cases = []
    for fmt in codec.FORMATS:
        for fp16 in (False, True):
            # Whole blocks of 32..256 take the warp kernel; the rest the row kernel.
            for h, bs in [(2048, 64), (4096, 32), (2048, 128), (1024, 256), (64, 64), (32, 32), (2047, 64),
                          (300, 7), (33, 1), (1, 1), (4096, 512), (130, 128), (8, 3), (96, 32)]:
                cases.append((fmt, fp16, (3, 5, h), bs, 1.0, False, True))
    for _ in range(n_random):
        h = int(rng.integers(1, 3000))
        cases.append((str(rng.choice(codec.FORMATS)), bool(rng.integers(2)), (int(rng.integers(1, 4)), int(rng.integers(1, 9)), h),
                      int(rng.choice([1, 2, 3, 7, 16, 32, 64, 128, 512])), float(rng.choice([1e-30, 1e-6, 1e-3, 1, 40, 3000, 1e30])),
                      bool(rng.integers(2)), bool(rng.integers(2))))
    ok = fails = 0
    for fmt, fp16, shape, bs, scale, zero_blocks, outliers in cases:
        x = sample(rng, shape, scale, fp16, zero_blocks, outliers)
        enc = codec.encode(x, fmt, bs)
        codes, scales = cuda_encode(lib, x, fmt, bs)
        if same_bytes(codes, enc.codes) and same_bytes(scales, enc.scales):
            ok += 1
        else:
            fails += 1
            if fails <= 10:
                what = first_difference(codes, enc.codes) if not same_bytes(codes, enc.codes) else "scales: " + first_difference(scales, enc.scales)
                log(f"  MISMATCH {fmt} fp16={fp16} shape={shape} bs={bs} scale={scale}: {what}")
    # Every finite fp16 value, both input types, two block sizes.
    allh = np.arange(1 << 16, dtype=np.uint16).view(np.float16)
    allh = allh[np.isfinite(allh)].reshape(4, -1)
    for fmt in codec.FORMATS:
        for bs in (1, 64):
            enc = codec.encode(allh, fmt, bs)
            for dtype in (np.float16, np.float32):
                codes, scales = cuda_encode(lib, allh.astype(dtype), fmt, bs)
                if same_bytes(codes, enc.codes) and same_bytes(scales, enc.scales):
                    ok += 1
                else:
                    fails += 1
                    log(f"  MISMATCH all-fp16-values {fmt} bs={bs} {np.dtype(dtype).name}: {first_difference(codes, enc.codes)}")
    # Every tie of each format's grid and one ulp either side (scale exactly 1).
    for fmt in codec.QMAX:
        x = conformance.rounding_edges(fmt)
        enc = codec.encode(x, fmt, x.shape[-1])
        codes, scales = cuda_encode(lib, x, fmt, x.shape[-1])
        if same_bytes(codes, enc.codes) and same_bytes(scales, enc.scales):
            ok += 1
        else:
            fails += 1
            log(f"  MISMATCH rounding edges {fmt}: {first_difference(codes, enc.codes)}")
    # Non-finite blocks: NaN scale, zero codes (those of a zero block), the rest untouched.
    for fmt in codec.FORMATS:
        for fp16 in (False, True):
            for h, bs in ((200, 1), (200, 7), (200, 64), (256, 32), (256, 64), (256, 128), (256, 256)):
                x = sample(rng, (2, 3, h), 2.0, fp16, False, False)
                x[0, 1, 5], x[1, 2, 150], x[1, 0, 199] = np.nan, np.inf, -np.inf
                codes, scales = cuda_encode(lib, x, fmt, bs)
                if fmt == "fp16":
                    good = same_bytes(codes, np.clip(x.astype(np.float32), -codec.FP16_MAX, codec.FP16_MAX).astype(np.float16))
                else:
                    good = (same_bytes(scales, codec.block_scales(x, fmt, bs))
                            and same_bytes(codes, codec.encode(zero_nonfinite_blocks(x, bs), fmt, bs).codes))
                ok, fails = (ok + 1, fails) if good else (ok, fails + 1)
                if not good:
                    log(f"  MISMATCH non-finite {fmt} fp16={fp16} bs={bs}")
    log(f"CUDA kernel vs codec.py: {ok} cases identical, {fails} mismatched")
    RESULTS["checks"].append({"name": "cuda_kernel_bit_identity", "identical": ok, "mismatched": fails})
    return fails == 0


def bench_row(lib, x: np.ndarray, fmt: str, bs: int, iters: int) -> None:
    ms_q, ms_c = ctypes.c_float(), ctypes.c_float()
    shape = x.shape
    rc = lib.mobillm_cuda_bench(x.ctypes.data, int(x.dtype == np.float16), int(np.prod(shape[:-1])), shape[-1],
                                codec.FORMAT_CODES[fmt], bs, iters, ctypes.byref(ms_q), ctypes.byref(ms_c))
    if rc != 0:
        raise RuntimeError(f"mobillm_cuda_bench failed: {lib.mobillm_cuda_last_error().decode()}")
    gbs_q, gbs_c = x.nbytes / ms_q.value / 1e6, x.nbytes / ms_c.value / 1e6
    log(f"{str(list(shape)):>16} {x.dtype.name[5:]:>5} {fmt:>6} {bs:>4} {ms_q.value:>10.4f} "
        f"{gbs_q:>12.1f} {gbs_c:>12.1f} {100 * gbs_q / gbs_c:>8.0f}%")
    RESULTS["bench"].append({"what": "cuda_kernel", "shape": list(shape), "dtype": x.dtype.name, "format": fmt,
                             "block_size": bs, "ms": ms_q.value, "gbs": gbs_q, "memcpy_ms": ms_c.value,
                             "memcpy_gbs": gbs_c})


def bench_cuda(lib, iters: int) -> None:
    rng = np.random.default_rng(1)
    shapes = [(16, 128, 2048), (64, 512, 2048)]
    extra = [((64, 512, 2048), np.float32, "nf4", 32), ((64, 512, 2048), np.float32, "nf4", 128),
             ((64, 512, 2047), np.float32, "int8", 64), ((64, 512, 2047), np.float32, "nf4", 64)]
    log("\nCUDA kernel throughput (GB/s of input read; memcpy D2D of the same buffer, same units)")
    log(f"{'shape':>16} {'input':>5} {'format':>6} {'bs':>4} {'kernel ms':>10} {'kernel GB/s':>12} "
        f"{'memcpy GB/s':>12} {'% memcpy':>9}")
    for shape in shapes:
        base = rng.standard_normal(shape).astype(np.float32)
        for dtype in (np.float32, np.float16):
            for fmt in codec.FORMATS:
                bench_row(lib, base.astype(dtype), fmt, 64, iters)
    for shape, dtype, fmt, bs in extra:
        bench_row(lib, rng.standard_normal(shape).astype(dtype), fmt, bs, iters)
    log("(memcpy GB/s counts the bytes copied once; its DRAM traffic is twice that.)")


def check_torch(iters: int) -> None:
    try:
        import torch
    except ImportError:
        RESULTS["skipped"].append("torch_codec on CUDA: torch is not installed")
        log("torch_codec on CUDA: skipped (no torch)")
        return
    if not torch.cuda.is_available():
        RESULTS["skipped"].append("torch_codec on CUDA: torch sees no CUDA device")
        log("torch_codec on CUDA: skipped (no CUDA device for torch)")
        return
    from mobillm.kernels import torch_codec
    rng = np.random.default_rng(2)
    ok = fails = 0
    for fmt in codec.FORMATS:
        for fp16 in (False, True):
            for shape, bs in [((4, 33, 300), 64), ((2, 7, 2048), 64), ((3, 5, 129), 7), ((2, 3, 17), 1)]:
                x = sample(rng, shape, 2.0, fp16, True, True)
                enc = codec.encode(x, fmt, bs)
                codes, scales = torch_codec.encode(torch.from_numpy(x).cuda(), fmt, bs)
                dec = torch_codec.decode(torch.from_numpy(enc.codes.copy()).cuda(), torch.from_numpy(enc.scales.copy()).cuda(),
                                         fmt, shape[-1], bs)
                good = (same_bytes(codes.cpu().numpy(), enc.codes) and same_bytes(scales.cpu().numpy(), enc.scales)
                        and same_bytes(dec.cpu().numpy(), codec.decode(enc)))
                ok, fails = (ok + 1, fails) if good else (ok, fails + 1)
                if not good:
                    log(f"  MISMATCH torch {fmt} fp16={fp16} shape={shape} bs={bs}")
    log(f"\ntorch_codec on CUDA vs codec.py (encode and decode): {ok} identical, {fails} mismatched")
    RESULTS["checks"].append({"name": "torch_codec_cuda_bit_identity", "identical": ok, "mismatched": fails})

    x = torch.from_numpy(rng.standard_normal((16, 128, 2048)).astype(np.float32)).cuda()
    log(f"torch_codec on CUDA, [16,128,2048] fp32 ({torch.cuda.get_device_name()}), GB/s of fp32 input/output")
    log(f"{'format':>6} {'encode GB/s':>12} {'decode GB/s':>12}")

    def timed(fn) -> float:
        fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - t) / iters

    for fmt in codec.FORMATS:
        codes, scales = torch_codec.encode(x, fmt, 64)
        t_enc = timed(lambda: torch_codec.encode(x, fmt, 64))
        t_dec = timed(lambda: torch_codec.decode(codes, scales, fmt, 2048, 64))
        gb = x.numel() * 4 / 1e9
        log(f"{fmt:>6} {gb / t_enc:>12.1f} {gb / t_dec:>12.1f}")
        RESULTS["bench"].append({"what": "torch_codec", "format": fmt, "encode_gbs": gb / t_enc, "decode_gbs": gb / t_dec})


def check_ort_cuda(lib_dir: Path) -> None:
    lib = lib_dir / "libmobillm_ort_ops_cuda.so"
    try:
        import onnxruntime as ort
    except ImportError:
        RESULTS["skipped"].append("ORT CUDA custom op: onnxruntime is not installed")
        log("ORT CUDA custom op: skipped (no onnxruntime)")
        return
    if "CUDAExecutionProvider" not in ort.get_available_providers() or not lib.is_file():
        why = "no CUDAExecutionProvider (onnxruntime-gpu)" if lib.is_file() else f"{lib.name} not built (no ORT headers)"
        RESULTS["skipped"].append(f"ORT CUDA custom op: {why}")
        log(f"ORT CUDA custom op: skipped ({why})")
        return
    from mobillm.kernels import onnx_codec
    rng = np.random.default_rng(3)
    ok = fails = 0
    for fmt in codec.FORMATS:
        model = onnx_codec.standalone_model(fmt, 64, 300, op="custom")
        so = ort.SessionOptions()
        so.register_custom_ops_library(str(lib))
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CUDAExecutionProvider"])
        x = sample(rng, (4, 9, 300), 3.0, False, True, True)
        codes, scales = sess.run(None, {"x": x})
        enc = codec.encode(x, fmt, 64)
        good = same_bytes(codes, enc.codes) and same_bytes(scales, enc.scales)
        ok, fails = (ok + 1, fails) if good else (ok, fails + 1)
    log(f"ORT CUDA custom op vs codec.py: {ok} identical, {fails} mismatched")
    RESULTS["checks"].append({"name": "ort_cuda_custom_op", "identical": ok, "mismatched": fails})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lib", type=Path, default=ROOT / "build" / "gpu" / "lib", help="folder of the built libraries")
    parser.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None,
                        help="folder for gpu_check.json (default: $OUT if set)")
    parser.add_argument("--random-cases", type=int, default=300, help="random shapes in the bit-identity check")
    parser.add_argument("--iters", type=int, default=50, help="timed iterations per benchmark row")
    parser.add_argument("--allow-skipped", action="store_true",
                        help="exit 0 even when a check was skipped (no torch CUDA, no onnxruntime-gpu); "
                             "by default a skipped check is a failure, exit 1")
    args = parser.parse_args()

    status = 0
    steps = []
    try:
        lib = load_cuda_lib(args.lib)
        log(f"device: {lib.mobillm_cuda_device_name().decode()}")
        RESULTS["device"] = lib.mobillm_cuda_device_name().decode()
        steps += [("cuda bit identity", lambda: check_bit_identity(lib, args.random_cases)),
                  ("cuda bench", lambda: bench_cuda(lib, args.iters))]
    except OSError as e:
        RESULTS["errors"].append(f"cannot load the CUDA library: {e}")
        log(f"cannot load the CUDA library from {args.lib}: {e}")
        status = 1
    steps += [("torch_codec cuda", lambda: check_torch(args.iters)), ("ort cuda op", lambda: check_ort_cuda(args.lib))]
    for name, step in steps:
        t = time.perf_counter()
        try:
            if step() is False:
                status = 1
        except Exception:
            status = 1
            RESULTS["errors"].append(f"{name}: {traceback.format_exc()}")
            log(f"{name} failed:\n{traceback.format_exc()}")
        log(f"[{name}: {time.perf_counter() - t:.1f} s]")
    if RESULTS["skipped"] and not args.allow_skipped:
        log(f"not measured (skipped): {'; '.join(RESULTS['skipped'])}; exit 1 (--allow-skipped accepts it)")
        status = 1
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_check.json").write_text(json.dumps(RESULTS, indent=1))
    return status


if __name__ == "__main__":
    sys.exit(main())
