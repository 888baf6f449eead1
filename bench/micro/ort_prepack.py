"""What ORT's weight pre-packing costs in memory and buys in speed, on an engine folder.

Each variant loads the engine's graph in a fresh process (so each peak RSS is its own), then
runs batches of 16 rows at 128 and 16 tokens alternately (random ids):

    python -m mobillm.bench.micro.ort_prepack ENGINE [ENGINE ...] --repeats 2

`prepack` is ORT's default (a second, re-laid-out copy of every MatMul weight);
`no-prepack` sets `session.disable_prepacking`, which `edge-run` does unless `--prepack`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CHILD = r'''
import json, sys, time
import numpy as np
import onnxruntime as ort
from mobillm.common.manifest import Manifest
from mobillm.common.procfs import peak_rss_mb, rss_mb
engine, variant, threads, batches = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
m = Manifest.load(engine, verify=False)
opts = ort.SessionOptions()
opts.intra_op_num_threads = threads
if variant == "no-prepack":
    opts.add_session_config_entry("session.disable_prepacking", "1")
t0 = time.perf_counter()
s = ort.InferenceSession(f"{engine}/{m.graph}", opts, providers=["CPUExecutionProvider"])
load_s, load_rss = time.perf_counter() - t0, rss_mb()
rng = np.random.default_rng(0)
times = {128: [], 16: []}
for i in range(2 + 2 * batches):  # the first two are warm-up
    T = (128, 16)[i % 2]
    ids = rng.integers(4, 1000, (16, T))
    t = time.perf_counter()
    s.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})
    if i >= 2:
        times[T].append(time.perf_counter() - t)
print(json.dumps({"load_s": load_s, "rss_after_load": load_rss, "peak": peak_rss_mb(),
                  "s128": float(np.median(times[128])), "s16": float(np.median(times[16]))}))
'''


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("engines", nargs="+", type=Path, help="engine folders (export-backbone --out)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batches", type=int, default=4, help="timed batches of each length per process")
    p.add_argument("--repeats", type=int, default=2, help="processes per variant, interleaved")
    a = p.parse_args()
    print("| engine | variant | RSS after load (MiB) | peak RSS (MiB) | s / batch 16x128 | s / batch 16x16 |")
    print("|---|---|---|---|---|---|")
    for engine in a.engines:
        runs: dict[str, list[dict]] = {"prepack": [], "no-prepack": []}
        for _ in range(a.repeats):
            for variant in runs:
                out = subprocess.run([sys.executable, "-c", CHILD, str(engine), variant, str(a.threads), str(a.batches)],
                                     capture_output=True, text=True, check=True)
                runs[variant].append(json.loads(out.stdout.strip().splitlines()[-1]))
        for variant, rs in runs.items():
            best = {k: min(r[k] for r in rs) for k in ("s128", "s16")}  # least disturbed run
            print(f"| {engine.name} | {variant} | {max(r['rss_after_load'] for r in rs):.0f} | "
                  f"{max(r['peak'] for r in rs):.0f} | {best['s128']:.3f} | {best['s16']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
