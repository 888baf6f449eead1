"""Baselines in one harness: Full-FT, LoRA (r 16, r 64), BitFit, split learning (every parameter, or
BitFit as the paper pairs it), LST, MobiLLM-L and mobillm.

    python -m mobillm.bench.paper.compare --model opt-350m --task sst2 --batch-size 16 --max-len 128 --budget-minutes 2

Every method runs in its own fresh process (bench/paper/compare_workers.py) under an address-space
limit, on the same training rows in the same batch order (the device's own length-bucketed
plan, `edge_runtime.batches.plan_batches`), with a random-init backbone built from the same
config and seed. Per method: device peak RSS (VmHWM), device compute seconds per iteration,
bytes per sample on the link, the dev metric against wall-clock, the time to reach a target
metric and the metric after the budget. Evaluation pauses each method's clock.

Early stopping, the same rule for every method (issue 26): `--holdout-rows` train rows (the next
rows of the same seeded permutation, never dev) are scored beside dev at every evaluation, and each
method's reported point is the evaluation within the budget with the best holdout metric (a tie goes
to the later point, so t = 0 is chosen only when it is strictly best), shown beside its dev metric
after the budget. Learning rates are each method's documented default, never tuned on dev.
`--data-seed` fixes the rows while `--seed` changes the initialisation and the data order
(bench/paper/parity.py runs seeds and reports mean ± sd and a paired bootstrap CI over dev examples).

Schedules end at the budget: the on-device methods decay their lr to 0 at it; a `--cache` run's
declared epochs (and so the server's linear decay over declared samples) are sized after its
server's warm-up, which streams 8 batches and trains 3 more epochs from the cache:
epochs = 1 + floor((--cache-fill x budget - rows x forward s/row) / (steps/epoch x cached s/step)),
at least 2. A mobillm run whose declared epochs do not end within the budget is cut at it, and the
early-stopping table says so.

The target is `--target-frac` x the best metric after the budget. A time-to-target ratio is only
reported when it means something: not when the target is not above a method's untrained
(t = 0) metric, and not when the best method ended within two binomial standard errors of the
best untrained accuracy (a random-init backbone on real GLUE data, for one); the table says
"not measurable" and why. `--summarize-only` rebuilds table, JSON and plot from a finished
run's `--work` folder.

The pieces: compare_config.py (the settings, the methods and the goals as tables), compare_data.py
(engines and data), compare_harness.py (processes under a memory cap), compare_methods.py (how
each kind of method runs), compare_workers.py (the processes themselves), compare_curves.py and
compare_report.py (metric over time, the table, JSON and plot).

- full / lora / lora64 / bitfit: the engine's model as AutoModelForSequenceClassification in torch,
  AdamW (LoRA: PEFT r 16 or r 64 on q_proj,v_proj; BitFit: biases, or norm scales for bias-free Gemma).
- split: the same classifier cut after `--split-layer`; device memory and device s/iter come from a
  separate process that holds only embeddings + the lower layers and runs their forward and
  backward; the accuracy run holds both halves in one process and adds the link time of the cut
  activation (up) and its gradient (down), fp32 and padded like the batch, at `--link-mbps`.
- split-bitfit: split learning as the MobiLLM paper pairs it: the same cut, but only biases (norm
  scales on bias-free Gemma) train on both halves, plus the server's head (`--lr-bitfit`).
- lst: Ladder Side-Tuning (bench/paper/lst.py): a d/8 copy of the backbone pruned by L1 norm, fed every
  layer's hidden state through a learned down-projection and gate; the backbone runs forward-only.
- Tasks with several dev splits (MNLI: dev_matched, dev_mismatched) score each on its own; the
  curves use the first, and the report adds a table of every split after the budget.
- mobillm-local (MobiLLM-L): ORT backbone + the side network trained in torch in the device process.
- mobillm-*: the streaming client (edge-run train) against a `trainer serve` process; pooled, tokens,
  pooled with the server's `--cache`, pooled through a proxy that limits the uplink to
  `--link-mbps`, and pooled on an engine exported with `--weights int8`. The server only returns
  the side network at the end, so the curve is built from the server's checkpoints (copied as
  they are written, turned into ONNX with `trainer export`'s function) plus the returned model,
  all scored on the device's path (JointModel). Each server gets one untimed warm-up run.

Reproduce the paper's setting with real weights (a machine with internet; a GPU for the server):
    python -m mobillm.bench.paper.compare --model facebook/opt-1.3b --server-device cuda --train-rows 67349 \
        --dev-rows 872 --budget-minutes 60
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from mobillm.bench.paper.compare_config import METHODS, Settings
from mobillm.bench.paper.compare_data import ensure_engine, prepare_data
from mobillm.bench.paper.compare_harness import Harness, log, run_jobs
from mobillm.bench.paper.compare_methods import (evaluate_side_networks, local_jobs, merge_split, run_edge,
                                                 size_cache_epochs, size_mobillm_runs, start_servers, warm_up)
from mobillm.bench.paper.compare_report import brief, report
from mobillm.common.errors import BadInput, run_command
from mobillm.common.options import add_options, from_args


def build_parser() -> argparse.ArgumentParser:
    """The flags: one per Settings field (compare_config.py), plus the repeatable --set."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(p, Settings)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="model config override, as export-backbone --set (e.g. hidden_size=64)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    s = from_args(Settings, args, overrides=tuple(args.overrides))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks: stop every child
    return run_command("compare", lambda: compare(s, argv))


def compare(s: Settings, argv) -> int:
    """Run (or with --summarize-only, re-report) one comparison; 1 when a method failed."""
    unknown = [m for m in s.methods if m not in METHODS]
    if unknown:
        raise BadInput(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    if shutil.which("prlimit") is None:
        raise BadInput("needs prlimit (util-linux) to cap each process's memory")
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="compare-") as tmp:
        s = replace(s, work=(s.work or Path(tmp)).resolve())
        for sub in ("logs", "snaps", "side"):
            (s.work / sub).mkdir(parents=True, exist_ok=True)
        servers: dict = {}
        try:
            return run_methods(s, servers, argv, t_start)
        finally:
            for server in servers.values():
                server.stop()


def run_methods(s: Settings, servers: dict, argv, t_start: float) -> int:
    """Engines, data, every method in its process, the evaluation, the report."""
    work = s.work
    remote = [m for m in s.methods if METHODS[m].server]
    if remote and s.jobs > 1 and s.mobillm_epochs:
        start_servers(s, work, remote, servers, s.train_rows)  # start-up overlaps the export and local methods
    engines = {"fp32": ensure_engine(s, work)}
    for weights in sorted({METHODS[m].server.weights for m in remote} - {"fp32"}):
        engines[weights] = ensure_engine(s, work, weights)
    data = prepare_data(s, engines["fp32"], work)
    manifest = data["manifest"]
    if s.engine is not None:
        s = replace(s, model=(manifest.gguf or {}).get("short_name") or Path(manifest.model_id).name)
    num_layers = manifest.num_layers
    s = replace(s, split_layer=s.split_layer or max(1, num_layers // 4))
    if not 1 <= s.split_layer < num_layers:
        raise BadInput(f"--split-layer must be in 1..{num_layers - 1}")
    h = Harness(s, work, engines, data)
    log(f"{s.model}: {num_layers} layers, {data['train_rows']} train / {data['dev_rows']} dev rows, "
        f"budget {s.budget_s:.0f} s per method, work folder {work}")
    if s.summarize_only:
        if not (work / "results.json").is_file():
            raise BadInput(f"--summarize-only: no {work / 'results.json'} (run the comparison first)")
        return report(s, data, json.loads((work / "results.json").read_text()), None, argv)
    jobs = [job for m in s.methods if not METHODS[m].server for job in local_jobs(h, m)]
    results = run_jobs(h, jobs, s.jobs)
    merge_split(results)
    if remote:
        s = size_mobillm_runs(h, results)
        start_servers(s, work, remote, servers, data["train_rows"])
        for m in remote:
            cache = METHODS[m].server.cache
            server = servers[METHODS[m].server.key]
            if not server.ready:
                server.wait_ready()
                cached_s = warm_up(h, server, cache)
                if cache:
                    s = replace(s, cached_s_per_step=cached_s)
            epochs, rule = size_cache_epochs(s, data["train_rows"], s.cached_s_per_step) if cache else \
                (s.mobillm_epochs, "sized from the forward rate")
            log(f"{m}: {METHODS[m].description}; {epochs} epochs ({rule})")
            results[m] = run_edge(h, m, server, epochs)
            results[m]["epochs_rule"] = rule
            results[m]["cached_s_per_step"] = s.cached_s_per_step if cache else None
            log(f"{m}: {brief(results[m])}")
    for server in servers.values():
        server.stop()
    evaluate_side_networks(h, results)
    (work / "results.json").write_text(json.dumps(results, indent=1, default=str))  # raw, for a closer look
    return report(s, data, results, time.perf_counter() - t_start, argv)


if __name__ == "__main__":
    sys.exit(main())
