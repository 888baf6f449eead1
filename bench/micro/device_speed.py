"""Device forward speed: torch eager and every engine variant, interleaved in one run.

Each round runs every variant once, round-robin, each in its own fresh process: it loads the
engine (or the torch model of the same weights), runs one warm-up batch and `--iters` timed
batches of random ids, and reports its best batch time and its own peak RSS (VmHWM). A variant's
speed is its best over `--rounds` rounds, so a round disturbed by other load does not count
against it. The table gives tokens/s, the ratio to `--baseline` and peak RSS, with the 1-minute
load average sampled before every measurement.

    python -m mobillm.bench.micro.device_speed --models opt-125m,opt-350m --rounds 5 --json-out speed.json
    python -m mobillm.bench.micro.device_speed --models gemma-3-270m --variants 'torch-eager,default*,int4*'
    python -m mobillm.bench.micro.device_speed --models opt-1.3b --heavy --wrap '/work/shared/tools/memcap 20000'
    python -m mobillm.bench.micro.device_speed --quick          # a tiny random model, one round: a smoke test

Variants are rows of `VARIANTS`: export-backbone flags plus the device's session options, so a
new engine option is one more row. A row whose flag the installed export-backbone does not know,
or whose export fails (e.g. --quant-op custom without the op library), is kept in the table as
skipped, with the reason, and the script then exits 1: a row asked for and not measured is a
failed benchmark. Engines are exported once into --engines/MODEL/ROW-FLAGS and reused.
"""

from __future__ import annotations

import argparse
import fnmatch
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from mobillm.bench.paths import TOKENIZER
from mobillm.common.sample import TINY_OPT

EXPORT_CLI = "import sys; from mobillm.export.cli import main; sys.exit(main())"


@dataclass(frozen=True)
class Variant:
    """One row: an engine exported with `flags` and opened with `session` options, or torch eager."""

    name: str
    flags: tuple[str, ...] = ()  # export-backbone flags beyond the model, --out and its weights source
    session: dict = field(default_factory=dict)  # keywords of edge_runtime.backbone.Backbone (e.g. prepack)
    torch: bool = False  # transformers AutoModel of the same weights, eager, same thread count


WEIGHTS = ("fp32", "fp16", "int8", "int4")
QUANTIZERS = {"std": ("--quant-op", "onnx"), "fused": ("--quant-op", "custom")}
OPTIMIZED = {"opt": ("--ort-fusions",), "noopt": ("--no-ort-fusions",)}
FP16_TAPS = ("--quant", "fp16")

VARIANTS = [
    Variant("torch-eager", torch=True),
    # the exporter's defaults, whatever they are: the path a new user gets
    Variant("default"),
    Variant("default-fp16taps", FP16_TAPS),
    Variant("default-notaprows", ("--no-tap-rows",)),  # every token quantized, as engines before tap_rows
    Variant("int4", ("--weights", "int4")),
    Variant("gguf", ("--weights", "gguf")),  # GGUF models only: the file's own quantized tensors
    Variant("int4-prepack", ("--weights", "int4"), {"prepack": True}),  # MatMulNBits packs its weights at load
    Variant("gguf-prepack", ("--weights", "gguf"), {"prepack": True}),
    Variant("int8-nosmooth", ("--weights", "int8", "--smooth-alpha", "0")),  # int8 without outlier migration
    Variant("int8-dynamic", ("--weights", "int8", "--int8-kernel", "dynamic")),  # quantize_dynamic, per-tensor activations
    Variant("int8-prepack", ("--weights", "int8", *QUANTIZERS["std"]), {"prepack": True}),  # int8-std, pre-packed
    Variant("int4-fp16taps", ("--weights", "int4", *FP16_TAPS)),
    # every weight format x tap quantizer x ORT transformer optimizer (the exporter's default, on, off)
    *(Variant(f"{w}-{q}-{o}".rstrip("-"), ("--weights", w, *QUANTIZERS[q], *OPTIMIZED.get(o, ())))
      for w, q, o in itertools.product(WEIGHTS, QUANTIZERS, ("", *OPTIMIZED))),
]

# Models: random init from export/configs unless real weights (a GGUF short name); heavy needs --heavy.
MODELS = {"opt-125m": {}, "opt-350m": {}, "gemma-3-270m": {"real": True}, "opt-1.3b": {"heavy": True}}
TINY = {**TINY_OPT, "num_hidden_layers": 2}  # --quick: export opt-125m with these --set overrides

# Code run in each measured process; it prints one JSON line.
CHILD = r'''
import json, sys, time
import numpy as np
a = json.loads(sys.argv[1])
B, T = a["batch"], a["seq"]
rng = np.random.default_rng(0)
t0 = time.perf_counter()
if a["torch"]:
    import torch
    torch.set_num_threads(a["threads"])
    from mobillm.common.manifest import Manifest
    from mobillm.export.source import model_from_manifest
    manifest = Manifest.load(a["engine"], verify=False)
    model = model_from_manifest(manifest, "fp32")
    vocab = int(manifest.config["vocab_size"])
    ids = torch.from_numpy(rng.integers(4, min(vocab, 50000), (B, T)))
    mask = torch.ones_like(ids)
    def run():
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, use_cache=False)
else:
    from mobillm.edge_runtime.backbone import Backbone
    bb = Backbone(a["engine"], threads=a["threads"], **a["session"])
    vocab = int(bb.manifest.config["vocab_size"])
    rows = list(rng.integers(4, min(vocab, 50000), (B, T)))
    def run():
        bb.forward(rows, keep=a["keep"])
load_s = time.perf_counter() - t0
run()  # warm-up: first-run allocations and kernel choices
times = []
for _ in range(a["iters"]):
    t = time.perf_counter()
    run()
    times.append(time.perf_counter() - t)
from mobillm.common.procfs import peak_rss_mb
print(json.dumps({"seconds": min(times), "load_s": load_s, "peak_rss_mb": peak_rss_mb()}))
'''


def select(patterns: str | None) -> list[Variant]:
    """The rows named by comma-separated names or globs (all when None), in table order."""
    if not patterns:
        return list(VARIANTS)
    wanted = [p.strip() for p in patterns.split(",") if p.strip()]
    for p in wanted:
        if not any(fnmatch.fnmatchcase(v.name, p) for v in VARIANTS):
            raise ValueError(f"--variants: {p!r} matches no row; rows are {', '.join(v.name for v in VARIANTS)}")
    return [v for v in VARIANTS if any(fnmatch.fnmatchcase(v.name, p) for p in wanted)]


def exporter_flags() -> set[str]:
    """Every --flag the installed export-backbone accepts (read from its --help)."""
    proc = subprocess.run([sys.executable, "-c", EXPORT_CLI, "--help"], capture_output=True, text=True)
    return set(re.findall(r"--[a-z0-9][a-z0-9-]*", proc.stdout))


def unknown_flags(flags: tuple[str, ...], known: set[str]) -> list[str]:
    """The flags of a row that the exporter does not know."""
    return [f for f in flags if f.startswith("--") and f not in known]


def tap_pairs(rows: list[Variant]) -> list[tuple[Variant, Variant]]:
    """(nf4-tap row, fp16-tap row) pairs: rows whose flags differ only by --quant fp16."""
    def key(v):
        f = list(v.flags)
        return tuple(f[:f.index("--quant")] + f[f.index("--quant") + 2:]) if "--quant" in f else tuple(f)
    fp16 = [v for v in rows if not v.torch and "--quant" in v.flags and
            v.flags[v.flags.index("--quant") + 1] == "fp16"]
    return [(n, f) for f in fp16 for n in rows
            if not n.torch and "--quant" not in n.flags and key(n) == key(f) and n.session == f.session]


def engine_dir(engines: Path, model: str, v: Variant, quick: bool = False) -> Path:
    """Where a row's engine lives: one folder per model (its tiny --quick form apart) and flag set."""
    slug = "_".join(f.lstrip("-") for f in v.flags) or "default"
    return engines / (f"{model}-tiny" if quick else model) / re.sub(r"[^A-Za-z0-9_.=-]", "-", slug)


def export_command(model: str, out: Path, flags: tuple[str, ...], quick: bool, wrap: list[str]) -> list[str]:
    cmd = [*wrap, sys.executable, "-c", EXPORT_CLI, model, "--out", str(out), *flags, "--quiet"]
    if not MODELS.get(model, {}).get("real"):
        cmd += ["--random-init"] + (["--tokenizer", str(TOKENIZER)] if TOKENIZER.is_dir() else [])
    if quick:
        cmd += [x for k, val in TINY.items() for x in ("--set", f"{k}={val}")]
    return cmd


def ensure_engine(model: str, v: Variant, a, known: set[str]) -> tuple[Path | None, str]:
    """(engine folder, "") ready to measure, or (None, why not)."""
    missing = unknown_flags(v.flags, known)
    if missing:
        return None, f"export-backbone has no {' '.join(missing)} (an older exporter?)"
    out = engine_dir(a.engines, model, v, a.quick)
    if (out / "manifest.json").is_file():
        return out, ""
    cmd = export_command(model, out, v.flags, a.quick, a.wrap)
    print(f"exporting {model} for {v.name} into {out}", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return None, f"export failed (exit {proc.returncode}): {last_line(proc)}"
    return out, ""


def last_line(proc: subprocess.CompletedProcess) -> str:
    """What a failed process said last (its error line), shortened for a table cell."""
    return (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1][:240]


def measure(engine: Path, v: Variant, a) -> dict:
    """One fresh process: its best batch time and its own peak RSS, or an error line."""
    args = {"engine": str(engine), "torch": v.torch, "session": v.session, "threads": a.threads,
            "batch": a.batch, "seq": a.seq, "iters": a.iters, "keep": a.keep}
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": last_line(proc)}
    return json.loads(lines[-1])


def run(a) -> dict:
    """Export what is missing, then measure every (model, row) round-robin for `a.rounds` rounds."""
    rows = a.rows
    known = exporter_flags()
    table: list[dict] = []
    for model in a.models:
        # torch eager rebuilds the weights recorded in an engine's manifest (any engine of the model will
        # do): the first row this exporter can build, else the default engine
        ref = next((v for v in rows if not v.torch and not unknown_flags(v.flags, known)), Variant("default"))
        for v in rows:
            engine, note = ensure_engine(model, ref if v.torch else v, a, known)
            table.append({"model": model, "variant": v.name, "flags": list(v.flags), "session": v.session,
                          "torch": v.torch, "engine": str(engine) if engine else None, "note": note, "runs": []})
    loads = []
    for _ in range(a.rounds):
        for row in table:
            if row["engine"] is None:
                continue
            loads.append(os.getloadavg()[0])
            v = Variant(row["variant"], tuple(row["flags"]), row["session"], row["torch"])
            row["runs"].append(measure(Path(row["engine"]), v, a))
    loads.append(os.getloadavg()[0])
    for row in table:
        summarize(row, a)
    for model in a.models:
        base = next((r for r in table if r["model"] == model and r["variant"] == a.baseline), None)
        for r in table:
            if r["model"] == model:
                ok = base and base.get("tokens_per_s") and r.get("tokens_per_s")
                r["ratio"] = r["tokens_per_s"] / base["tokens_per_s"] if ok else None
    settings = {k: (str(val) if isinstance(val, Path) else val) for k, val in vars(a).items() if k != "rows"}
    return {"settings": settings,
            "load_average_1min": {"min": min(loads), "mean": sum(loads) / len(loads), "max": max(loads),
                                  "cores": os.cpu_count()},
            "rows": table, "tap_cost": tap_costs(table, rows, a.models)}


def summarize(row: dict, a) -> None:
    good = [r for r in row["runs"] if "error" not in r]
    errors = [r["error"] for r in row["runs"] if "error" in r]
    if row["engine"] is not None and not good:
        row["note"] = f"failed: {errors[-1] if errors else 'not run'}"
    row["seconds_per_batch"] = min(r["seconds"] for r in good) if good else None
    row["tokens_per_s"] = a.batch * a.seq / row["seconds_per_batch"] if good else None
    row["peak_rss_mib"] = max(r["peak_rss_mb"] for r in good) if good else None
    row["status"] = "ok" if good else ("failed" if row["engine"] else "skipped")


def tap_costs(table: list[dict], rows: list[Variant], models: list[str]) -> list[dict]:
    """Tap quantization cost: nf4 taps vs fp16 taps on the same engine otherwise, as a share of
    the nf4 engine's forward time."""
    out = []
    by = {(r["model"], r["variant"]): r for r in table}
    for model in models:
        for nf4, fp16 in tap_pairs(rows):
            n, f = by[(model, nf4.name)], by[(model, fp16.name)]
            if n["seconds_per_batch"] and f["seconds_per_batch"]:
                cost = (n["seconds_per_batch"] - f["seconds_per_batch"]) / n["seconds_per_batch"]
                out.append({"model": model, "nf4": nf4.name, "fp16": fp16.name, "cost_percent": 100 * cost})
    return out


def render(result: dict) -> str:
    """The markdown tables: speed and memory per row, then the tap quantization cost."""
    s = result["settings"]
    load = result["load_average_1min"]
    lines = [f"batch {s['batch']} x {s['seq']} tokens, taps kept: {s['keep']}, {s['threads']} threads, best of {s['rounds']} rounds x "
             f"{s['iters']} batches, ratio vs {s['baseline']}; load average (1 min) during the run: "
             f"{load['min']:.2f}-{load['max']:.2f} (mean {load['mean']:.2f}) on {load['cores']} cores",
             "", "| model | variant | tokens/s | x baseline | peak RSS MiB | note |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        tps = f"{r['tokens_per_s']:,.0f}" if r["tokens_per_s"] else "-"
        ratio = f"{r['ratio']:.2f}" if r.get("ratio") else "-"
        rss = f"{r['peak_rss_mib']:,.0f}" if r["peak_rss_mib"] else "-"
        lines.append(f"| {r['model']} | {r['variant']} | {tps} | {ratio} | {rss} | {r['note']} |")
    if result["tap_cost"]:
        lines += ["", "Tap quantization cost (nf4 taps vs fp16 taps, share of the nf4 engine's forward time):", "",
                  "| model | nf4 row | fp16 row | cost |", "|---|---|---|---|"]
        lines += [f"| {c['model']} | {c['nf4']} | {c['fp16']} | {c['cost_percent']:+.1f} % |"
                  for c in result["tap_cost"]]
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=None,
                   help=f"comma-separated: {', '.join(MODELS)} (opt-1.3b needs --heavy; default: opt-125m,opt-350m, "
                        f"with --quick opt-125m)")
    p.add_argument("--variants", default=None,
                   help="comma-separated row names or globs, e.g. 'torch-eager,default*,int4-*' (default: all: "
                        + ", ".join(v.name for v in VARIANTS) + ")")
    p.add_argument("--baseline", default="torch-eager", help="row the ratio column divides by")
    p.add_argument("--engines", type=Path, default=Path("engines/speed"),
                   help="folder of exported engines, reused when present (MODEL/FLAGS)")
    p.add_argument("--rounds", type=int, default=5, help="round-robin rounds; each row's best round counts")
    p.add_argument("--iters", type=int, default=2, help="timed batches per process (its best counts)")
    p.add_argument("--batch", type=int, default=16, help="rows per batch")
    p.add_argument("--seq", type=int, default=128, help="tokens per row")
    p.add_argument("--threads", type=int, default=2, help="ORT intra-op threads and torch threads")
    p.add_argument("--keep", default="pooled", choices=("pooled", "tokens", "all"),
                   help="tap rows the engine returns (Backbone.forward keep=): pooled, edge-run's default, is each "
                        "row's last token")
    p.add_argument("--heavy", action="store_true", help="allow opt-1.3b (export needs ~20 GB; see --wrap)")
    p.add_argument("--wrap", type=shlex.split, default=[],
                   help="command prefix for exports, e.g. '/work/shared/tools/memcap 20000' (default: none)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: a tiny random opt-125m (2 layers, hidden 64), batch 2 x 16, 1 round, 1 batch")
    p.add_argument("--json-out", type=Path, default=None, help="write the results as JSON here (default: none)")
    a = p.parse_args(argv)
    if a.quick:
        a.batch, a.seq, a.rounds, a.iters = min(a.batch, 2), min(a.seq, 16), 1, 1
    models = a.models or ("opt-125m" if a.quick else "opt-125m,opt-350m")
    a.models = [m.strip() for m in models.split(",") if m.strip()]
    try:
        a.rows = select(a.variants)
    except ValueError as exc:
        p.error(str(exc))
    for m in a.models:
        if m not in MODELS:
            p.error(f"--models: unknown {m!r}; choose from {', '.join(MODELS)}")
        if MODELS[m].get("heavy") and not a.heavy:
            p.error(f"--models {m}: the export needs ~20 GB of RAM; pass --heavy (and a --wrap memory cap)")
        if a.quick and MODELS[m].get("real"):
            p.error(f"--models {m}: --quick shrinks a random-init OPT, and {m} has real weights")
    if min(a.rounds, a.iters, a.batch, a.seq, a.threads) < 1:
        p.error("--rounds, --iters, --batch, --seq and --threads must be >= 1")
    return a


def unmeasured(result: dict) -> list[str]:
    """'model variant: why' for every row that was asked for and has no measurement."""
    return [f"{r['model']} {r['variant']}: {r['note'] or r['status']}" for r in result["rows"] if r["status"] != "ok"]


def main(argv=None) -> int:
    a = parse_args(argv)
    result = run(a)
    print(render(result))
    if a.json_out:
        a.json_out.parent.mkdir(parents=True, exist_ok=True)
        a.json_out.write_text(json.dumps(result, indent=1))
    missing = unmeasured(result)
    for line in missing:
        print(f"device_speed: not measured: {line}", file=sys.stderr)
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
