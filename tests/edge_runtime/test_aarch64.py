"""The device side on aarch64, under qemu user-mode emulation (bench/ci/aarch64/setup.sh builds it).

An engine exported here (x86-64) with one tap per format runs on an emulated aarch64 device
(arm64 Python, the aarch64 onnxruntime/numpy wheels, the fused quantizer cross-compiled for
aarch64): `edge-run train` streams to an x86 `trainer serve` on 127.0.0.1, then `edge-run eval`
and `predict` run with the side network it got back. Checked:

* the tap quantizers (numpy reference, fused C++ kernel, the engine's fused com.mobillm op and its
  standard-op subgraph) give the same bytes on both architectures from the same input, every format;
* the taps the aarch64 device sends, next to the x86 device's for the same rows: not bit-identical,
  because the backbone's fp32 forward is not (ONNX Runtime's MLAS runs per-ISA GEMM and softmax
  kernels that round differently, AVX2/FMA here and NEON there); a tap value ~1 fp32 ulp apart
  crosses a rounding boundary now and then. Bounded: at most one quantization level apart, on at
  most 1 % of the elements (measured: docs/edge_runtime.md, "aarch64");
* identical eval metrics and predictions for the same side network on both architectures;
* torch is not importable on the emulated device, and was not imported.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import write_rows

from mobillm.common import wire
from mobillm.kernels import codec, native

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
AARCH64 = ROOT / "build" / "aarch64"
FORMATS = "int8,fp8,int4,nf4,fp16"
QEMU_TIMEOUT = 240

if shutil.which("qemu-aarch64-static") is None:
    pytest.skip("qemu-aarch64-static is not installed (apt-get install qemu-user-static; bench/ci/aarch64/setup.sh)",
                allow_module_level=True)
if not (AARCH64 / "edge-run").is_file():
    pytest.skip(f"no aarch64 sysroot in {AARCH64}: run bench/ci/aarch64/setup.sh", allow_module_level=True)
torch = pytest.importorskip("torch", exc_type=ModuleNotFoundError)  # the x86 trainer server
onnx = pytest.importorskip("onnx", exc_type=ModuleNotFoundError)

from mobillm.common.netsim import LinkProxy  # noqa: E402
from mobillm.edge_runtime import cli  # noqa: E402
from mobillm.kernels import onnx_codec  # noqa: E402
from mobillm.trainer.config import ServerConfig  # noqa: E402
from mobillm.trainer.server import TrainerServer  # noqa: E402

# Runs on the emulated device: every quantizer implementation over the cases in argv[1] -> argv[2].
QUANTIZE_CHILD = r'''
import json, platform, sys
import numpy as np, onnxruntime as ort
from mobillm.kernels import codec, native
cases, models = np.load(sys.argv[1]), json.loads(open(sys.argv[3]).read())
out = {}
for name in cases.files:
    fmt, bs = name.split("_")[:2]
    x = cases[name]
    enc = codec.encode(x, fmt, int(bs))
    out[name + "/numpy"] = np.concatenate([enc.codes.view(np.uint8).ravel(), enc.scales.view(np.uint8).ravel()])
    codes, scales = native.quantize(x, fmt, int(bs))
    out[name + "/native"] = np.concatenate([codes.view(np.uint8).ravel(), scales.view(np.uint8).ravel()])
    for op, path in models[name].items():
        opts = ort.SessionOptions()
        if op == "custom":
            native.register_op_library(opts)
        codes, scales = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"]).run(None, {"x": x})
        out[name + "/" + op] = np.concatenate([codes.view(np.uint8).ravel(), scales.view(np.uint8).ravel()])
np.savez(sys.argv[2], **out)
print(json.dumps({"machine": platform.machine(), "isa": native.codec_isa(), "torch": "torch" in sys.modules,
                  "op_library": str(native.find_library("ort_ops"))}))
'''


def emulated(*args: str, timeout: float = QEMU_TIMEOUT, env: dict | None = None) -> subprocess.CompletedProcess:
    """A command of the emulated device (build/aarch64/python or edge-run), its output captured."""
    proc = subprocess.run([str(AARCH64 / args[0]), *args[1:]], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    assert proc.returncode == 0, f"{args[:3]} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    return proc


def quantizer_cases() -> dict[str, np.ndarray]:
    """Tap-like inputs for every format: normal rows with outliers, fp16 input, zero and denormal
    blocks, exact rounding ties, a width that is no multiple of the block."""
    rng = np.random.default_rng(20)
    cases = {}
    for fmt in codec.FORMATS:
        x = rng.standard_normal((2, 5, 200)).astype(np.float32) * np.float32(3)
        x[0, 1, 7] = 900.0
        x[0, 2, :64] = 0.0
        x[1, 0, 64:128] = np.float32(1e-41)
        x[1, 3, :] = (np.arange(200) % 17 - 8 + 0.5).astype(np.float32)  # ties at the int grid
        cases[f"{fmt}_64_fp32"] = x
        cases[f"{fmt}_32_fp16"] = (x[:, :, :96] / 8).astype(np.float16)
    return cases


def stale_copies() -> list[str]:
    """Device sources whose copy in the emulated device's site folder differs from the checkout."""
    sources = [p for pkg in ("common", "kernels", "edge_runtime") for p in (ROOT / pkg).rglob("*.py")]
    return [str(p.relative_to(ROOT)) for p in sources
            if p.name != "torch_codec.py"  # server side only, not installed on the device
            and not ((copy := AARCH64 / "site" / "mobillm" / p.relative_to(ROOT)).is_file()
                     and copy.read_bytes() == p.read_bytes())]


@pytest.fixture(scope="module", autouse=True)
def current_device_copy():
    """The emulated device runs a copy of mobillm made by setup.sh: a stale copy is refreshed by
    rerunning it (cached downloads: seconds), never tested."""
    if stale_copies():
        subprocess.run(["bash", str(ROOT / "bench" / "ci" / "aarch64" / "setup.sh")], check=True, capture_output=True,
                       timeout=600)
    if stale := stale_copies():
        pytest.fail(f"the emulated device's copy of mobillm is stale ({', '.join(stale[:3])}) after "
                    f"bench/ci/aarch64/setup.sh", pytrace=False)


@pytest.fixture(scope="module")
def engine(tiny_engine_factory):
    """A tiny random OPT, five layers, one tap per format, both quantizer graphs."""
    return tiny_engine_factory(quant=FORMATS, overrides={"num_hidden_layers": 5}, quant_op="custom")


def test_quantizers_are_bit_identical_across_architectures(tmp_path):
    cases = quantizer_cases()
    np.savez(tmp_path / "cases.npz", **cases)
    models = {}
    for name, x in cases.items():
        fmt, bs, dtype = name.split("_")
        input_dtype = onnx.TensorProto.FLOAT16 if dtype == "fp16" else onnx.TensorProto.FLOAT
        models[name] = {}
        for op in ("onnx", "custom"):
            path = tmp_path / f"{name}_{op}.onnx"
            onnx.save(onnx_codec.standalone_model(fmt, int(bs), x.shape[-1], 3, input_dtype, op=op), path)
            models[name][op] = str(path)
    (tmp_path / "models.json").write_text(json.dumps(models))
    (tmp_path / "child.py").write_text(QUANTIZE_CHILD)
    proc = emulated("python", str(tmp_path / "child.py"), str(tmp_path / "cases.npz"), str(tmp_path / "arm.npz"),
                    str(tmp_path / "models.json"))
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    # the aarch64 build of the fused kernel (its generic, NEON-vectorized path), from the device's own package
    assert report == {"machine": "aarch64", "isa": "generic", "torch": False,
                      "op_library": str(AARCH64 / "site" / "mobillm" / "kernels" / "lib" / "libmobillm_ort_ops.so")}
    arm = np.load(tmp_path / "arm.npz")
    assert len(arm.files) == 4 * len(cases)
    for name, x in cases.items():
        fmt, bs = name.split("_")[:2]
        ref = codec.encode(x, fmt, int(bs))
        want = np.concatenate([ref.codes.view(np.uint8).ravel(), ref.scales.view(np.uint8).ravel()]).tobytes()
        for impl in ("numpy", "native", "onnx", "custom"):
            assert arm[f"{name}/{impl}"].tobytes() == want, f"{name}: aarch64 {impl} differs from x86 numpy"


def client_messages(blob: bytes) -> list[bytes]:
    """The data messages of one captured client-to-server WebSocket connection (RFC 6455 frames,
    masked, uncompressed: the device turns compression off), after the HTTP upgrade request."""
    pos, messages, partial = blob.index(b"\r\n\r\n") + 4, [], b""
    while pos < len(blob):
        b0, b1 = blob[pos], blob[pos + 1]
        pos += 2
        size = b1 & 0x7F
        if size in (126, 127):
            width = 2 if size == 126 else 8
            size, pos = int.from_bytes(blob[pos:pos + width], "big"), pos + width
        mask = np.frombuffer(blob[pos:pos + 4], np.uint8) if b1 & 0x80 else np.zeros(4, np.uint8)
        pos += 4 if b1 & 0x80 else 0
        payload = (np.frombuffer(blob[pos:pos + size], np.uint8) ^ np.resize(mask, size)).tobytes()
        pos += size
        if b0 & 0x0F >= 8:  # close, ping, pong
            continue
        partial += payload
        if b0 & 0x80:
            messages.append(partial)
            partial = b""
    return messages


def sent_taps(blob: bytes) -> dict[int, list[wire.TapPayload]]:
    """sample id -> the taps the device sent for it (tokens mode: one tap row per real token)."""
    rows = {}
    for message in client_messages(blob):
        frame = wire.decode_frame(message)
        if frame.type != wire.MsgType.BATCH:
            continue
        batch = wire.Batch.from_body(frame.body)
        ends = np.cumsum(batch.lengths)
        for i, sample in enumerate(batch.sample_ids):
            sl = slice(int(ends[i] - batch.lengths[i]), int(ends[i]))
            rows[int(sample)] = [wire.TapPayload(t.fmt, t.block_size, t.hidden, t.codes[sl], t.scales[sl], t.index)
                                 for t in batch.taps]
    return rows


def widest_step(fmt: str) -> float:
    """The widest gap between adjacent levels of a format, in units of its block scale; for fp16
    (no scale) one fp16 ulp at the row's largest value, in units of that value (<= 2**-10)."""
    if fmt == "fp16":
        return 2.0 ** -10
    values = codec.code_values(fmt)
    return float(np.diff(np.unique(values[np.isfinite(values)])).max())


def fp16_order(x: np.ndarray) -> np.ndarray:
    """float16 bits as integers in the order of their values (adjacent floats differ by 1)."""
    bits = np.asarray(x, np.float16).view(np.int16).astype(np.int64)
    return np.where(bits < 0, -(bits & 0x7FFF), bits)


def compare_taps(x86: dict, arm: dict) -> dict[str, tuple[float, float]]:
    """Per format: (fraction of elements that differ, largest difference in widest steps). Asserts
    the bound: scales at most one fp16 ulp apart; each decoded element at most one of the format's
    widest level steps apart (int8/int4: one level, the levels are even); at most 1 % differ."""
    assert x86.keys() == arm.keys() and len(x86) > 0
    seen: dict[str, list[tuple[float, float]]] = {}
    for sample, taps in x86.items():
        for a, b in zip(taps, arm[sample], strict=True):
            assert (a.fmt, a.codes.shape, a.scales.shape) == (b.fmt, b.codes.shape, b.scales.shape)
            assert np.abs(fp16_order(a.scales) - fp16_order(b.scales)).max(initial=0) <= 1
            da = codec.decode_arrays(a.codes, a.scales, a.fmt, a.hidden, a.block_size)
            db = codec.decode_arrays(b.codes, b.scales, b.fmt, b.hidden, b.block_size)
            if a.fmt == "fp16":
                unit = np.abs(da).max(axis=-1, keepdims=True)
            else:
                scales = np.maximum(a.scales.astype(np.float32), b.scales.astype(np.float32))
                unit = np.repeat(scales, a.block_size, axis=-1)[..., :a.hidden]
            steps = np.abs(da - db) / np.maximum(unit, np.finfo(np.float32).tiny) / widest_step(a.fmt)
            assert steps.max(initial=0) <= 1, f"sample {sample} tap {a.index} ({a.fmt}): {steps.max():.2f} steps apart"
            seen.setdefault(a.fmt, []).append((float(np.mean(da != db)), float(steps.max(initial=0))))
    result = {fmt: (float(np.mean([f for f, _ in v])), max(m for _, m in v)) for fmt, v in seen.items()}
    assert set(result) == set(FORMATS.split(",")) and max(f for f, _ in result.values()) <= 0.01, result
    return result


def test_train_eval_predict_on_emulated_aarch64(engine, tmp_path, capsys):
    started = time.monotonic()
    data = write_rows(tmp_path / "train.tsv", 24)
    dev = write_rows(tmp_path / "dev.tsv", 12, seed=1)
    server = TrainerServer(ServerConfig(host="127.0.0.1", port=0, runs_dir=str(tmp_path / "runs")))
    port = server.start()
    try:
        blobs = {}
        for machine in ("x86_64", "aarch64"):
            with LinkProxy(port, capture=True) as proxy:
                args = ["train", "--engine", str(engine), "--data", str(data), "--task", "sst2", "--send", "tokens",
                        "--server", f"ws://127.0.0.1:{proxy.port}", "--epochs", "1", "--batch-size", "8",
                        "--run", f"run-{machine}", "--side-out", str(tmp_path / f"side_{machine}.onnx"), "-q"]
                if machine == "x86_64":
                    assert cli.main(args) == 0
                else:
                    emulated("edge-run", *args)
                blobs[machine] = bytes(proxy.captured)
    finally:
        server.stop()
    fractions = compare_taps(sent_taps(blobs["x86_64"]), sent_taps(blobs["aarch64"]))
    with capsys.disabled():  # the measured difference, for docs/edge_runtime.md (pytest -s shows it)
        print(f"aarch64 vs x86-64 taps, per format (fraction differing, largest difference in widest steps): "
              f"{fractions}")

    # The side network the aarch64 device got back, scored on both architectures.
    side = tmp_path / "side_aarch64.onnx"
    assert side.is_file()
    common = ["--engine", str(engine), "--side", str(side), "--data", str(dev), "--task", "sst2", "-q"]
    capsys.readouterr()
    assert cli.main(["eval", *common]) == 0
    x86_metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    arm_metrics = json.loads(emulated("edge-run", "eval", *common).stdout.strip().splitlines()[-1])
    assert arm_metrics == x86_metrics and x86_metrics["rows"] == 12
    predictions = {}
    for machine in ("x86_64", "aarch64"):
        out = tmp_path / f"preds_{machine}.jsonl"
        args = ["predict", *common, "--out", str(out)]
        assert (cli.main(args) == 0) if machine == "x86_64" else emulated("edge-run", *args)
        predictions[machine] = [json.loads(line) for line in out.read_text().splitlines()]
    x86_preds, arm_preds = predictions["x86_64"], predictions["aarch64"]
    assert [p["prediction"] for p in arm_preds] == [p["prediction"] for p in x86_preds] and len(arm_preds) == 12
    assert np.allclose([p["logits"] for p in arm_preds], [p["logits"] for p in x86_preds], atol=1e-4)
    assert not (AARCH64 / "site" / "torch").exists()  # the device's site has no torch to import
    elapsed = time.monotonic() - started
    assert elapsed < 240, f"the emulated run took {elapsed:.0f} s; keep it within the slow tier's budget"


# On the emulated device: the engine with this machine's x86-64 library first in the search path,
# then with only that library (the device's own moved out of the search path).
FOREIGN_CHILD = r'''
import logging, sys
logging.basicConfig(format="%(message)s")
from mobillm.edge_runtime.backbone import Backbone
from mobillm.kernels import native
print(Backbone(sys.argv[1]).engine_session.quantizer, native.find_library("ort_ops"))
native.search_dirs = lambda: [native.Path(sys.argv[2])]
print(Backbone(sys.argv[1]).engine_session.quantizer, native.find_library("ort_ops"))
'''


def test_only_another_architectures_library_falls_back_on_aarch64(engine):
    """This machine's x86-64 op library handed to the aarch64 device: passed over for the device's
    own; when it is the only one, one line and the standard graph. Never dlopen'ed."""
    x86_lib = native.ensure_library("ort_ops")
    assert native.library_machine(x86_lib) == native.this_machine() == "x86_64"
    proc = emulated("python", "-c", FOREIGN_CHILD, str(engine), str(x86_lib.parent),
                    env={"MOBILLM_NATIVE_DIR": str(x86_lib.parent)})
    own = AARCH64 / "site" / "mobillm" / "kernels" / "lib" / "libmobillm_ort_ops.so"
    assert proc.stdout.splitlines() == [f"fused {own}", "standard None"]
    notices = [line for line in proc.stderr.splitlines() if "fused tap quantizer unavailable" in line]
    assert len(notices) == 1, proc.stderr
    assert f"{x86_lib} is built for x86_64, this device is aarch64" in notices[0]
