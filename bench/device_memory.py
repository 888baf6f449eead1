"""Peak RSS of the device process: edge-run train vs inference-only vs torch fine-tuning.

Each variant runs in its own fresh process and reports its own peak RSS (VmHWM), at the same
model dims, batch 16, seq 128, random weights. The edge-run variant streams to a trainer
server running in another process (whose memory is not the device's).

    python bench/device_memory.py --models opt-125m,opt-350m --steps 4
    python bench/device_memory.py --models opt-1.3b --variants edge,ort --weights fp32,int4
    python bench/device_memory.py --models gemma-3-270m --weights fp32,fp16,int8,int4   # real weights

Engines are exported into --engines (default engines/) when missing.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mobillm.common.netsim import free_port

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT.parent / "shared" / "data" / "tokenizer" / "opt"
ALL_VARIANTS = ["edge", "ort", "torch-infer", "lora", "bitfit", "lst", "full"]

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
    for _ in range(steps):
        bb.forward(rows)
elif variant == "edge":
    from mobillm.edge_runtime.cli import main
    rc = main(["train", "--engine", args["engine"], "--data", args["data"], "--task", "sst2", "--server", args["server"],
               "--batch-size", str(B), "--max-len", str(T), "--send", args["send"], "--side-out", args["side_out"], "-q"])
    assert rc == 0
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
    if variant == "torch-infer":
        model.eval()
        with torch.no_grad():
            for _ in range(steps):
                model(input_ids=ids)
    else:
        sys.path.insert(0, args["bench"])
        from baselines import adapt
        model, params = adapt(model, variant)
        opt = torch.optim.AdamW(params, lr=1e-4)
        model.train()
        for _ in range(steps):
            loss = model(input_ids=ids, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
print(json.dumps({"peak_rss_mb": peak_rss_mb(), "seconds": time.perf_counter() - t0}))
'''


def ensure_engine(model: str, weights: str, engines: Path) -> Path:
    """The nf4-tap engine of `model` with `weights`: real weights for a GGUF short name
    (gemma-3-270m), random init from the shipped config otherwise."""
    from mobillm.export.gguf import is_gguf_name

    out = engines / f"{model}-{weights}"
    if (out / "manifest.json").is_file():
        return out
    cmd = ["export-backbone", model, "--out", str(out), "--weights", weights, "--quant", "nf4"]
    if not is_gguf_name(model):
        cmd += ["--random-init"] + (["--tokenizer", str(TOKENIZER)] if TOKENIZER.is_dir() else [])
    print("exporting:", " ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, check=True)
    return out


def long_rows(path: Path, n: int) -> None:
    """Training rows that all tokenize to >= 128 tokens (so batches really are 16 x 128)."""
    words = ("the film is a gripping funny and often affecting journey through a bleak and desperate "
             "landscape of memory loss love and regret").split()
    with open(path, "w") as f:
        f.write("sentence\tlabel\n")
        for i in range(n):
            f.write(" ".join(words[(i + k) % len(words)] for k in range(160)) + f"\t{i % 2}\n")


def measure(variant: str, args: dict, mem_limit_gb: float) -> dict:
    cmd = [sys.executable, "-c", CHILD, json.dumps(dict(args, variant=variant, bench=str(Path(__file__).parent)))]
    limit = int(mem_limit_gb * 1024**3)
    proc = subprocess.run(["prlimit", f"--as={limit}", "--"] + cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1][:120]}
    return json.loads(lines[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="opt-125m,opt-350m")
    p.add_argument("--variants", default=",".join(ALL_VARIANTS))
    p.add_argument("--weights", default="fp32", help="engine weight formats to measure for edge/ort (comma list)")
    p.add_argument("--steps", type=int, default=4, help="forward (or training) steps per variant")
    p.add_argument("--send", default="tokens", choices=["tokens", "pooled"])
    p.add_argument("--engines", type=Path, default=ROOT / "engines")
    p.add_argument("--mem-limit-gb", type=float, default=20.0, help="address-space cap per measured process")
    p.add_argument("--json-out", type=Path, default=None)
    a = p.parse_args()
    variants = a.variants.split(",")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "rows.tsv"
        long_rows(data, 16 * a.steps)
        port = free_port()
        server = subprocess.Popen(["trainer", "serve", "--host", "127.0.0.1", "--port", str(port),
                                   "--runs", str(Path(tmp) / "runs")], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        try:
            time.sleep(3)
            for model in a.models.split(","):
                from mobillm.export.gguf import is_gguf_name
                from mobillm.common.manifest import Manifest

                config = ROOT / "export" / "configs" / f"{model}.json"
                pretrained = None
                if is_gguf_name(model):  # the torch variants load the checkpoint the engines came from
                    pretrained = Manifest.load(ensure_engine(model, "fp32", a.engines), verify=False).model_id
                common = {"batch": 16, "seq": 128, "steps": a.steps, "config": str(config), "data": str(data),
                          "server": f"ws://127.0.0.1:{port}", "send": a.send, "pretrained": pretrained}
                row = {"model": model}
                for weights in a.weights.split(","):
                    if not {"edge", "ort"} & set(variants):
                        break
                    engine = ensure_engine(model, weights, a.engines)
                    for v in ("edge", "ort"):
                        if v in variants:
                            r = measure(v, dict(common, engine=str(engine), side_out=str(Path(tmp) / f"{model}.onnx")),
                                        a.mem_limit_gb)
                            row[f"{v}[{weights}]"] = r
                for v in variants:
                    if v not in ("edge", "ort"):
                        row[v] = measure(v, common, a.mem_limit_gb)
                results.append(row)
                print(json.dumps(row), file=sys.stderr)
        finally:
            server.terminate()
            server.wait(10)
    print_table(results)
    if a.json_out:
        a.json_out.write_text(json.dumps(results, indent=2))


def print_table(results: list[dict]) -> None:
    print("\n| model | variant | peak RSS (MiB) | x ORT inference | x LoRA | seconds |")
    print("|---|---|---|---|---|---|")
    for row in results:
        ort_mb = next((v["peak_rss_mb"] for k, v in row.items() if k.startswith("ort[") and "peak_rss_mb" in v), None)
        lora = row.get("lora", {}).get("peak_rss_mb")
        for k, v in row.items():
            if k == "model":
                continue
            if "error" in v:
                print(f"| {row['model']} | {k} | failed: {v['error']} | | | |")
                continue
            mb = v["peak_rss_mb"]
            r1 = f"{mb / ort_mb:.2f}" if ort_mb else ""
            r2 = f"{mb / lora:.2f}" if lora else ""
            print(f"| {row['model']} | {k} | {mb:.0f} | {r1} | {r2} | {v['seconds']:.1f} |")


if __name__ == "__main__":
    main()
