"""Where a device process's peak memory goes while it loads an engine and runs it, change by change.

    python -m mobillm.bench.micro.load_memory ENGINE [ENGINE ...] --batch 16 --seq 128 --steps 3 \
        --out docs/runs/load_memory_gemma.json

Each row is a fresh process that opens the engine one way, runs `--steps` batches of random ids, and
reports its RSS after loading, its peak RSS (VmHWM) at load and at the end, and its seconds per batch:

- `tokenizer alone`: only the engine's tokenizer: RSS after loading it, its peak, and the RSS once
  the C heap is trimmed (the "peak" column), no session, no batches.

- `before`: how `Backbone` opened an engine until this change: the session first (weights parsed out
  of the graph file), then the tokenizer, ORT's memory pattern on.
- `tokenizer first`: the tokenizer loads first and the C heap is trimmed after it (its JSON parse is
  the largest transient of the process: ~250 MiB for Gemma 3's 262k-token tokenizer.json).
- `+ no mem pattern`: also ORT's memory pattern off (from a shape's second call it allocates the
  shape's whole plan as one block).
- `+ weights mapped` = `Backbone` now: also the weights in backbone.onnx.data, which ORT maps into
  memory instead of copying out of the protobuf (pages of the embedding table that no token uses
  are never read). Run on a copy of the engine whose graph file holds no weights; an engine
  exported since this change already is one.

ORT weight pre-packing is off in every row, as in `edge-run`. Exit 1 if a row could not be measured.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r'''
import json, sys, time
import numpy as np
args = json.loads(sys.argv[1])
from mobillm.common.procfs import peak_rss_mb, rss_mb, trim_heap
folder = args["engine"]
if args["variant"] == "tokenizer alone":
    from mobillm.common.manifest import Manifest
    from mobillm.common.tokenize import EngineTokenizer
    m = Manifest.load(folder, verify=False)
    tok = EngineTokenizer(f"{folder}/{m.tokenizer_dir}", m.token_rules)
    loaded, peak_load = rss_mb(), peak_rss_mb()
    trim_heap()
    print(json.dumps({"loaded_mb": loaded, "peak_load_mb": peak_load, "peak_mb": rss_mb(), "s_per_batch": 0.0}))
    sys.exit(0)
if args["variant"] == "+ weights mapped":
    from mobillm.edge_runtime.backbone import Backbone
    bb = Backbone(folder, threads=args["threads"], verify=False)
    run = lambda rows: bb.forward(rows)
else:
    import onnxruntime as ort
    from mobillm.common.manifest import Manifest
    from mobillm.common.tokenize import EngineTokenizer
    from mobillm.edge_runtime.backbone import Backbone
    m = Manifest.load(folder, verify=False)
    def tokenizer():
        return EngineTokenizer(f"{folder}/{m.tokenizer_dir}", m.token_rules)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args["threads"]
    opts.add_session_config_entry("session.disable_prepacking", "1")
    opts.enable_mem_pattern = args["variant"] in ("before", "tokenizer first")
    if args["variant"] == "before":
        session = ort.InferenceSession(f"{folder}/{m.graph}", opts, providers=["CPUExecutionProvider"])
        tok = tokenizer()
    else:
        tok = tokenizer()
        trim_heap()
        session = ort.InferenceSession(f"{folder}/{m.graph}", opts, providers=["CPUExecutionProvider"])
        trim_heap()
    bb = Backbone.__new__(Backbone)  # the same forward as edge-run's, on this session
    bb.folder, bb.manifest, bb.session, bb.tokenizer = folder, m, session, tok
    bb._outputs = [name for t in m.taps for name in t.graph_outputs]
    run = lambda rows: bb.forward(rows)
loaded, peak_load = rss_mb(), peak_rss_mb()
rng = np.random.default_rng(0)
rows = [rng.integers(3, args["vocab"], args["seq"]) for _ in range(args["batch"])]
times = []
for _ in range(args["steps"]):
    t0 = time.perf_counter()
    run(rows)
    times.append(time.perf_counter() - t0)
print(json.dumps({"loaded_mb": loaded, "peak_load_mb": peak_load, "peak_mb": peak_rss_mb(),
                  "s_per_batch": min(times)}))
'''

VARIANTS = ["tokenizer alone", "before", "tokenizer first", "+ no mem pattern", "+ weights mapped"]


def mapped_copy(engine: Path, tmp: Path) -> Path:
    """`engine` with its weights in backbone.onnx.data (a copy; the folder itself when it already is)."""
    from mobillm.common.manifest import Manifest
    from mobillm.export.graph import move_weights_out

    if Manifest.load(engine, verify=False).external_data:
        return engine
    out = tmp / engine.name
    shutil.copytree(engine, out)
    move_weights_out(out)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("engines", nargs="+", type=Path, help="engine folders made by export-backbone")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=50000, help="random ids are drawn from [3, vocab)")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    rows, failed = [], 0
    with open("/proc/loadavg") as f:
        load_before = f.read().split()[:3]
    with tempfile.TemporaryDirectory(prefix="load-memory-") as tmp:
        for engine in a.engines:
            for variant in VARIANTS:
                folder = mapped_copy(engine, Path(tmp)) if variant == "+ weights mapped" else engine
                spec = {"engine": str(folder), "variant": variant, "batch": a.batch, "seq": a.seq, "steps": a.steps,
                        "threads": a.threads, "vocab": a.vocab}
                proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], capture_output=True, text=True)
                row = {"engine": engine.name, "variant": variant}
                if proc.returncode != 0:
                    failed += 1
                    row["error"] = (proc.stderr.strip().splitlines() or ["?"])[-1]
                else:
                    row.update(json.loads(proc.stdout.strip().splitlines()[-1]))
                rows.append(row)
                print(json.dumps(row), file=sys.stderr)
    with open("/proc/loadavg") as f:
        load_after = f.read().split()[:3]
    print(f"batch {a.batch} x {a.seq} random ids, {a.steps} forwards, {a.threads} threads, pre-packing off; load "
          f"average {' '.join(load_before)} -> {' '.join(load_after)}\n")
    print("| engine | variant | RSS after load (MiB) | peak at load (MiB) | peak (MiB; tokenizer alone: RSS after "
          "the heap trim) | s / batch |\n|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['engine']} | {r['variant']} | failed: {r['error']} | | | |")
        else:
            print(f"| {r['engine']} | {r['variant']} | {r['loaded_mb']:,.0f} | {r['peak_load_mb']:,.0f} | "
                  f"{r['peak_mb']:,.0f} | {r['s_per_batch']:.2f} |")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps({"command": "python -m mobillm.bench.micro.load_memory " +
                                     " ".join(argv if argv is not None else sys.argv[1:]),
                                     "loadavg": [load_before, load_after], "rows": rows}, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
