"""Where an engine's forward time goes, by operator type: ONNX Runtime's own profiler.

    python -m mobillm.bench.micro.profile_engine ENGINE [ENGINE ...] --batch 16 --seq 128 --threads 2 --out docs/runs/profile.json

Each engine is opened as the device opens it (standard quantizers, weight pre-packing off), run
once to warm up, then `--runs` times with SessionOptions.enable_profiling on random token ids
(every row full length, every position tapped; `--prepack` lets ORT pre-pack weights). The profiler's per-node kernel times are summed by
operator type (MatMulNBits, DynamicQuantizeMatMul, MatMul, ...); printed as a table and written
as JSON with the load average at the start and end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np


def profile(engine: Path, batch: int, seq: int, runs: int, threads: int, prepack: bool = False) -> dict:
    import onnxruntime as ort

    from mobillm.common.manifest import Manifest
    from mobillm.edge_runtime.backbone import row_indices
    from mobillm.edge_runtime.session import open_session

    manifest = Manifest.load(engine)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.add_session_config_entry("session.disable_prepacking", "0" if prepack else "1")
    opts.enable_profiling = True
    opts.profile_file_prefix = str(Path(os.environ.get("TMPDIR", "/tmp")) / f"ortprof-{os.getpid()}")
    session = open_session(engine, manifest, opts, ["CPUExecutionProvider"], "standard").session
    rng = np.random.default_rng(0)
    vocab = int(manifest.config.get("vocab_size", 1000))
    feeds = {"input_ids": rng.integers(3, vocab, (batch, seq)).astype(np.int64),
             "attention_mask": np.ones((batch, seq), np.int64)}
    if manifest.row_input:
        feeds[manifest.row_input] = row_indices(np.full(batch, seq), seq, "all")
    feeds.update(manifest.switch_feed())
    names = [n for t in manifest.taps for n in (t.codes_output, t.scales_output)]
    session.run(names, feeds)  # warm-up, profiled too; dropped below by run index
    walls = []
    for _ in range(runs):
        t0 = time.perf_counter()
        session.run(names, feeds)
        walls.append(time.perf_counter() - t0)
    trace_file = Path(session.end_profiling())
    trace = json.loads(trace_file.read_text())
    trace_file.unlink()
    by_op: dict[str, float] = defaultdict(float)
    model_runs = [e for e in trace if e.get("cat") == "Session" and e.get("name") == "model_run"]
    first_end = model_runs[0]["ts"] + model_runs[0]["dur"] if model_runs else 0
    for e in trace:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time") and e["ts"] >= first_end:
            by_op[e["args"].get("op_name", "?")] += e["dur"] / 1e3 / runs  # ms per forward
    total = sum(by_op.values())
    ops = sorted(by_op.items(), key=lambda kv: -kv[1])
    return {"engine": str(engine), "weights": manifest.weights, "prepack": prepack, "weight_quant": {
                k: v for k, v in (manifest.weight_quant or {}).items() if k in ("tool", "bits", "accuracy_level")},
            "batch": batch, "seq": seq, "threads": threads, "runs": runs,
            "wall_ms": [1e3 * w for w in walls], "wall_ms_median": 1e3 * float(np.median(walls)),
            "kernel_ms": total, "by_op_ms": dict(ops), "by_op_share": {k: v / total for k, v in ops}}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("engines", nargs="+", type=Path)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prepack", action="store_true", help="let ORT pre-pack weights (edge-run --prepack)")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    record = {"command": "python -m mobillm.bench.micro.profile_engine " + " ".join(argv or sys.argv[1:]),
              "load_average_start": os.getloadavg(), "engines": []}
    for engine in a.engines:
        r = profile(engine, a.batch, a.seq, a.runs, a.threads, a.prepack)
        record["engines"].append(r)
        print(f"{engine} ({r['weights']}): {r['wall_ms_median']:.0f} ms per forward (median of {a.runs}), "
              f"kernels {r['kernel_ms']:.0f} ms")
        for op, ms in list(r["by_op_ms"].items())[:8]:
            print(f"  {op:<28} {ms:8.1f} ms  {100 * r['by_op_share'][op]:5.1f} %")
    record["load_average_end"] = os.getloadavg()
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
