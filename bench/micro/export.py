"""Export cost and engine speed per model and --weights option, next to torch eager.

Prints the markdown tables quoted in docs/benchmarks.md ("Export (issue 3)"):

    python -m mobillm.bench.micro.export                                # opt-125m, opt-350m
    prlimit --as=20000000000 python -m mobillm.bench.micro.export --models opt-1.3b --weights fp32,int4

Every number comes from its own child process (this script re-run with `child ...`), so peak
RSS (VmHWM from /proc/self/status) is that variant's alone. Models are random-init from the real
OPT configs (no weights on this machine); torch eager uses the same seed, hence the same weights.
Forward: batch 16 x seq 128, all tokens real, median of --repeats runs after one warm-up,
--threads intra-op threads for both ONNX Runtime and torch.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mobillm.bench.paths import TOKENIZER
from mobillm.common.procfs import peak_rss_mb

BATCH, SEQ = 16, 128


def batch_inputs(vocab: int):
    import numpy as np

    rng = np.random.default_rng(0)
    ids = rng.integers(3, min(vocab, 50000), size=(BATCH, SEQ), dtype=np.int64)
    ids[:, 0] = 2
    return ids, np.ones_like(ids)


def child_export(model: str, out: str, weights: str) -> dict:
    from mobillm.export.pipeline import export_engine

    t = time.perf_counter()
    manifest = export_engine(model, Path(out), random_init=True, tokenizer=TOKENIZER, weights=weights,
                             force=True, progress=False)
    seconds = time.perf_counter() - t
    sizes = {rel: (Path(out) / rel).stat().st_size for rel in manifest.files if not rel.startswith("tokenizer/")}
    return {"seconds": seconds, "peak_rss_mb": peak_rss_mb(), "graph_bytes": sum(sizes.values()),
            "files": sorted(sizes), "exporter": manifest.exporter["exporter"],
            "bytes_per_token": manifest.bytes_per_token()}


def child_ort(engine: str, threads: int, repeats: int) -> dict:
    import onnxruntime as ort

    from mobillm.common.manifest import Manifest

    manifest = Manifest.load(engine, verify=False)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    t = time.perf_counter()
    session = ort.InferenceSession(str(Path(engine) / manifest.graph), options, providers=["CPUExecutionProvider"])
    load_seconds = time.perf_counter() - t
    ids, mask = batch_inputs(manifest.config["vocab_size"])
    feed = {"input_ids": ids, "attention_mask": mask}
    session.run(None, feed)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - t)
    return {"ms": 1000 * statistics.median(times), "load_seconds": load_seconds, "peak_rss_mb": peak_rss_mb()}


def child_torch(model: str, threads: int, repeats: int) -> dict:
    import torch

    from mobillm.export.source import build_model, load_config, resolve_source

    torch.set_num_threads(threads)
    source = resolve_source(model, random_init=True)
    config = load_config(source)
    net = build_model(source, config, seed=0)
    ids, mask = (torch.from_numpy(a) for a in batch_inputs(config.vocab_size))
    with torch.no_grad():
        net(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            net(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
            times.append(time.perf_counter() - t)
    return {"ms": 1000 * statistics.median(times), "peak_rss_mb": peak_rss_mb()}


def in_child(*args: str) -> dict:
    """Run this script's `child` mode in a fresh process; its last stdout line is the JSON result."""
    proc = subprocess.run([sys.executable, "-m", "mobillm.bench.micro.export", "child", *args], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or [""]
        print(f"child {' '.join(args)} failed (exit {proc.returncode}): {tail[0]}", file=sys.stderr)
        return {"error": f"failed, exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def mb(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:,.0f} MB"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="mode")
    child = sub.add_parser("child", help="internal: measure one thing in this process")
    child.add_argument("what", choices=["export", "ort", "torch"])
    child.add_argument("args", nargs="*")
    p.add_argument("--models", default="opt-125m,opt-350m", help="comma list of short names (default "
                                                                   "opt-125m,opt-350m)")
    p.add_argument("--weights", default="fp32,fp16,int8,int4", help="comma list of --weights options")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads for ORT and torch (default 2)")
    p.add_argument("--repeats", type=int, default=3, help="timed forwards per variant (default 3)")
    p.add_argument("--workdir", type=Path, default=None, help="where engines are written (default: a temp "
                                                              "folder, removed at the end)")
    args = p.parse_args(argv)

    if args.mode == "child":
        a = args.args
        result = {"export": lambda: child_export(a[0], a[1], a[2]),
                  "ort": lambda: child_ort(a[0], int(a[1]), int(a[2])),
                  "torch": lambda: child_torch(a[0], int(a[1]), int(a[2]))}[args.what]()
        print(json.dumps(result))
        return 0

    if not (TOKENIZER / "vocab.json").is_file():
        print(f"bench/micro/export.py: the OPT tokenizer is missing at {TOKENIZER}; nothing measured", file=sys.stderr)
        return 2
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-export-"))
    rows, torch_rows = [], []
    try:
        for model in args.models.split(","):
            for weights in args.weights.split(","):
                engine = workdir / f"{model}-{weights}"
                exp = in_child("export", model, str(engine), weights)
                fwd = {} if "error" in exp else in_child("ort", str(engine), str(args.threads), str(args.repeats))
                shutil.rmtree(engine, ignore_errors=True)
                rows.append((model, weights, exp, fwd))
                print(f"{model} {weights}: {exp} {fwd}", file=sys.stderr, flush=True)
            eager = in_child("torch", model, str(args.threads), str(args.repeats))
            torch_rows.append((model, eager))
            print(f"{model} torch: {eager}", file=sys.stderr, flush=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)

    print(f"Forward: batch {BATCH} x seq {SEQ}, {args.threads} threads, median of {args.repeats}.\n")
    print("| model | --weights | exporter | export time | export peak RSS | graph files | ORT forward | "
          "ORT peak RSS |")
    print("|---|---|---|---|---|---|---|---|")
    for model, weights, exp, fwd in rows:
        if "error" in exp or "error" in fwd:
            print(f"| {model} | {weights} | | {exp.get('error', '')} | | | {fwd.get('error', '')} | |")
            continue
        exporter = exp["exporter"].split("(")[-1].rstrip(")")
        print(f"| {model} | {weights} | {exporter} | {exp['seconds']:.0f} s | {mb(exp['peak_rss_mb'] * 2**20)} | "
              f"{mb(exp['graph_bytes'])} ({' + '.join(exp['files'])}) | {fwd['ms']:,.0f} ms | "
              f"{mb(fwd['peak_rss_mb'] * 2**20)} |")
    print("\n| model | torch eager forward (fp32) | torch peak RSS |")
    print("|---|---|---|")
    for model, eager in torch_rows:
        if "error" in eager:
            print(f"| {model} | {eager['error']} | |")
            continue
        print(f"| {model} | {eager['ms']:,.0f} ms | {mb(eager['peak_rss_mb'] * 2**20)} |")
    failed = [f"{m} {w}" for m, w, exp, fwd in rows if "error" in exp or "error" in fwd]
    failed += [f"{m} torch" for m, eager in torch_rows if "error" in eager]
    if failed:  # a row asked for and not measured fails the benchmark
        print(f"bench/micro/export.py: not measured: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
