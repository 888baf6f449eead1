"""Peak RSS of the device process: edge-run train vs inference-only vs torch fine-tuning.

Each variant runs in its own fresh process and reports its own peak RSS (VmHWM), at the same
model dims, batch 16, seq 128 (--seq 256: the paper's Table IV), random weights. The edge-run
variant streams to a trainer server running in another process (whose memory is not the device's).
Every measured process runs under an RSS cap (--device-cap for edge/ort, --lora-cap for the torch
variants): one that passes it is killed and reported as "> cap", a lower bound, not a failure.

    python -m mobillm.bench.micro.device_memory --models opt-125m,opt-350m --steps 4
    python -m mobillm.bench.micro.device_memory --models opt-1.3b --variants edge,ort --weights fp32,int4
    python -m mobillm.bench.micro.device_memory --models gemma-3-270m --weights fp32,fp16,int8,int4   # real weights
    # the paper's Table IV setting (OPT-1.3B, 16 x 256), engines already in /work/engines:
    python -m mobillm.bench.micro.device_memory --models opt-1.3b --seq 256 --steps 1 --variants ort,edge,lora \
        --weights fp32,int8,int4 --engines /work/engines --missing skip --lora-cap 20000

Engines are exported into --engines (default engines/) when missing (--missing skip: left out).
Exit status 1 when a variant asked for failed (a "failed:" row); a process killed at its cap is a
bound, not a failure.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from mobillm.bench.paths import ROOT, TOKENIZER
from mobillm.bench.server import TrainerServe
from mobillm.common.procfs import rss_mb

ALL_VARIANTS = ["edge", "ort", "torch-infer", "lora", "bitfit", "lst", "full"]
DEVICE_VARIANTS = ("edge", "ort")  # run an engine; the others build the torch model

# Code run inside each measured process. It prints one JSON line with its own VmHWM.
CHILD = r'''
import json, sys, time
from mobillm.common.procfs import peak_rss_mb
args = json.loads(sys.argv[1])
variant, B, T, steps = args["variant"], args["batch"], args["seq"], args["steps"]
t0 = time.perf_counter()
if variant == "ort":
    import numpy as np
    from mobillm.edge_runtime.backbone import Backbone
    bb = Backbone(args["engine"])
    rows = [np.random.default_rng(i).integers(3, 50000, T) for i in range(B)]
    t1 = time.perf_counter()
    for _ in range(steps):
        bb.forward(rows)
    per_batch = (time.perf_counter() - t1) / steps
elif variant == "edge":
    from mobillm.edge_runtime.cli import main
    rc = main(["train", "--engine", args["engine"], "--data", args["data"], "--task", "sst2", "--server", args["server"],
               "--batch-size", str(B), "--max-len", str(T), "--send", args["send"], "--side-out", args["side_out"],
               "--stats-out", args["stats_out"], "-q"])
    assert rc == 0
    st = json.load(open(args["stats_out"]))
    per_batch = st["forward_s"] / max(st["batches_sent"], 1)
else:
    import torch
    torch.manual_seed(0)
    if args.get("pretrained"):  # real weights: the checkpoint the engine was exported from
        from transformers import AutoModelForSequenceClassification
        model = AutoModelForSequenceClassification.from_pretrained(args["pretrained"], num_labels=2,
                                                                   attn_implementation="eager")
    else:
        from transformers import OPTConfig, OPTForSequenceClassification
        cfg = OPTConfig(**json.load(open(args["config"])))
        cfg.num_labels = 2
        model = OPTForSequenceClassification(cfg)
    ids = torch.randint(3, 50000, (B, T))
    labels = torch.randint(0, 2, (B,))
    t1 = time.perf_counter()
    if variant == "torch-infer":
        model.eval()
        with torch.no_grad():
            for _ in range(steps):
                model(input_ids=ids)
    else:
        from mobillm.bench.paper.baselines import adapt
        model, params = adapt(model, variant)
        opt = torch.optim.AdamW(params, lr=1e-4)
        model.train()
        for _ in range(steps):
            loss = model(input_ids=ids, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    per_batch = (time.perf_counter() - t1) / steps
print(json.dumps({"peak_rss_mb": peak_rss_mb(), "seconds": time.perf_counter() - t0, "s_per_batch": per_batch}))
'''


# --weights rows that are more than a format: int8's quantize_dynamic kernel (the default is blocks)
WEIGHT_FLAGS = {"int8-dynamic": ["--weights", "int8", "--int8-kernel", "dynamic"]}


def ensure_engine(model: str, weights: str, engines: Path, export: bool = True) -> Path | None:
    """The nf4-tap engine of `model` with `weights`: real weights for a GGUF short name
    (gemma-3-270m), random init from the shipped config otherwise. Missing and not `export`: None."""
    from mobillm.export.gguf import is_gguf_name

    out = engines / f"{model}-{weights}"
    if (out / "manifest.json").is_file():
        return out
    if not export:
        return None
    cmd = ["export-backbone", model, "--out", str(out), *WEIGHT_FLAGS.get(weights, ["--weights", weights]), "--quant", "nf4"]
    if not is_gguf_name(model):
        cmd += ["--random-init"] + (["--tokenizer", str(TOKENIZER)] if TOKENIZER.is_dir() else [])
    print("exporting:", " ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, check=True)
    return out


def long_rows(path: Path, n: int, seq: int = 128) -> None:
    """Training rows that all tokenize to >= `seq` tokens (so batches really are 16 x seq)."""
    words = ("the film is a gripping funny and often affecting journey through a bleak and desperate "
             "landscape of memory loss love and regret").split()
    with open(path, "w") as f:
        f.write("sentence\tlabel\n")
        for i in range(n):
            f.write(" ".join(words[(i + k) % len(words)] for k in range(seq + 32)) + f"\t{i % 2}\n")


def run_capped(cmd: list[str], cap_mb: float, poll_s: float = 0.2) -> tuple[int, str, str, float]:
    """Run `cmd`, killing it once its RSS passes `cap_mb` (0: no cap): (returncode, stdout, stderr,
    highest RSS seen in MiB). A killed run returns -9, and a highest RSS above the cap."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        seen = 0.0
        while proc.poll() is None:
            try:
                seen = max(seen, rss_mb(proc.pid))
            except KeyError:  # exited between poll() and the read: /proc holds a zombie with no VmRSS
                pass
            if cap_mb and seen > cap_mb:
                proc.kill()
            try:
                proc.wait(poll_s)
            except subprocess.TimeoutExpired:
                pass
        out.seek(0)
        err.seek(0)
        return proc.returncode, out.read(), err.read(), seen


def measure(variant: str, args: dict, cap_mb: float, mem_limit_gb: float = 0.0) -> dict:
    """One variant in a fresh process: its JSON line ({"peak_rss_mb", "seconds", "s_per_batch"}),
    {"over_cap_mb": cap} when it passed the RSS cap, or {"error": last stderr line}."""
    cmd = [sys.executable, "-c", CHILD, json.dumps(dict(args, variant=variant))]
    if mem_limit_gb:
        cmd = ["prlimit", f"--as={int(mem_limit_gb * 1024**3)}", "--"] + cmd
    rc, out, err, seen = run_capped(cmd, cap_mb)
    if cap_mb and seen > cap_mb:
        return {"over_cap_mb": cap_mb}
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    if rc != 0 or not lines:
        return {"error": (err.strip().splitlines() or ["failed"])[-1][:120]}
    return json.loads(lines[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="opt-125m,opt-350m", help="short model names (comma list)")
    p.add_argument("--variants", default=",".join(ALL_VARIANTS), help=f"comma list of {', '.join(ALL_VARIANTS)}")
    p.add_argument("--weights", default="fp32", help="engine weight formats to measure for edge/ort (comma list; "
                   "int8-dynamic: --weights int8 --int8-kernel dynamic)")
    p.add_argument("--steps", type=int, default=4, help="forward (or training) steps per variant")
    p.add_argument("--batch", type=int, default=16, help="rows per batch")
    p.add_argument("--seq", type=int, default=128, help="tokens per row (every row is that long; paper: 256)")
    p.add_argument("--send", default="tokens", choices=["tokens", "pooled"], help="edge-run train --send")
    p.add_argument("--engines", type=Path, default=ROOT / "engines", help="engine folders, named MODEL-WEIGHTS")
    p.add_argument("--missing", default="export", choices=["export", "skip"],
                   help="an engine not in --engines: export it, or leave its rows out")
    p.add_argument("--device-cap", type=float, default=12000,
                   help="RSS cap (MiB) of each edge/ort process; past it: killed, reported as > cap (0: none)")
    p.add_argument("--lora-cap", type=float, default=20000,
                   help="RSS cap (MiB) of each torch process (lora, bitfit, lst, full, torch-infer); past it: killed, "
                        "reported as > cap, a lower bound (0: none)")
    p.add_argument("--mem-limit-gb", type=float, default=0.0,
                   help="also an address-space cap (prlimit --as) per process, GiB; such a run fails rather "
                        "than being reported as > cap (0: none)")
    p.add_argument("--json-out", type=Path, default=None, help="also write the results as JSON here")
    a = p.parse_args()
    variants = a.variants.split(",")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "rows.tsv"
        long_rows(data, a.batch * a.steps, a.seq)
        with TrainerServe(Path(tmp) / "runs") as server:
            for model in a.models.split(","):
                from mobillm.export.gguf import is_gguf_name
                from mobillm.common.manifest import Manifest

                config = ROOT / "export" / "configs" / f"{model}.json"
                pretrained = None
                if is_gguf_name(model):  # the torch variants load the checkpoint the engines came from
                    pretrained = Manifest.load(ensure_engine(model, "fp32", a.engines), verify=False).model_id
                common = {"batch": a.batch, "seq": a.seq, "steps": a.steps, "config": str(config), "data": str(data),
                          "server": server.url, "send": a.send, "pretrained": pretrained,
                          "stats_out": str(Path(tmp) / "stats.json")}
                row = {"model": model}
                for weights in a.weights.split(","):
                    if not set(DEVICE_VARIANTS) & set(variants):
                        break
                    engine = ensure_engine(model, weights, a.engines, export=a.missing == "export")
                    if engine is None:
                        print(f"no engine {a.engines / f'{model}-{weights}'}: {weights} rows left out", file=sys.stderr)
                        continue
                    for v in DEVICE_VARIANTS:
                        if v in variants:
                            r = measure(v, dict(common, engine=str(engine), side_out=str(Path(tmp) / f"{model}.onnx")),
                                        a.device_cap, a.mem_limit_gb)
                            row[f"{v}[{weights}]"] = r
                for v in variants:
                    if v not in DEVICE_VARIANTS:
                        row[v] = measure(v, common, a.lora_cap, a.mem_limit_gb)
                results.append(row)
                print(json.dumps(row), file=sys.stderr)
    print_table(results)
    if a.json_out:
        a.json_out.write_text(json.dumps(results, indent=2))
    # A process killed at its cap is a measurement (a bound); one that failed is not: exit 1.
    failed = [f"{row['model']} {k}" for row in results for k, v in row.items() if k != "model" and "error" in v]
    if failed:
        print(f"device_memory: not measured: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def ratio(mb: float, ref: dict) -> str:
    """mb / ref's peak RSS; against a reference killed at its cap, an upper bound ("< r")."""
    if "peak_rss_mb" in ref:
        return f"{mb / ref['peak_rss_mb']:.2f}"
    if "over_cap_mb" in ref:
        return f"< {mb / ref['over_cap_mb']:.2f}"
    return ""


def table_rows(results: list[dict]) -> list[str]:
    """The markdown rows: a process killed at its cap reads "> cap" (a lower bound)."""
    lines = []
    for row in results:
        ort = next((v for k, v in row.items() if k.startswith("ort[") and "peak_rss_mb" in v), {})
        lora = row.get("lora", {})
        for k, v in row.items():
            if k == "model":
                continue
            if "error" in v:
                lines.append(f"| {row['model']} | {k} | failed: {v['error']} | | | | |")
            elif "over_cap_mb" in v:
                lines.append(f"| {row['model']} | {k} | > {v['over_cap_mb']:.0f} (killed at the cap) | | | | |")
            else:
                mb, per = v["peak_rss_mb"], v.get("s_per_batch")
                per = f"{per:.1f}" if per is not None else ""
                lines.append(f"| {row['model']} | {k} | {mb:.0f} | {ratio(mb, ort)} | {ratio(mb, lora)} | {per} | "
                             f"{v['seconds']:.1f} |")
    return lines


def print_table(results: list[dict]) -> None:
    print("\n| model | variant | peak RSS (MiB) | x ORT inference | x LoRA | s / batch | seconds |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(table_rows(results)))


if __name__ == "__main__":
    sys.exit(main())
