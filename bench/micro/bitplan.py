"""Both bit-allocation rules on the same throttled uplink: `--bits auto:utility` vs `auto:paper`.

One engine exported with --quant fp16 --tap-formats int4,nf4,fp8,int8,fp16 (the formats are
switched in the graph), one `trainer serve`, and per bandwidth a LinkProxy throttling the uplink
(common/netsim.py, as bench/paper/compare.py's 60 Mbps method). Each rule x bandwidth is a short run
(tokens mode, so the taps are big enough for the link to matter) followed by a dev evaluation.
Printed per run: the bit-widths the planner chose per tap (its last plan, the share of each format
over all re-plans, and the distinct plans in order), the device's uplink estimate (median), bytes
and wire seconds per batch, and dev accuracy.

    python -m mobillm.bench.micro.bitplan --rows 256 --dev-rows 200 --mbps 10,60,100
    python -m mobillm.bench.micro.bitplan --engine ENGINE --rows 2048 --dev-rows 400 --latency-target 0.2   # a real backbone
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from mobillm.bench.paths import GLUE, TOKENIZER
from mobillm.bench.server import TrainerServe
from mobillm.common.netsim import LinkProxy

SST2 = GLUE / "SST-2"
RUNGS = "int4,nf4,fp8,int8,fp16"


def export(engine: Path, model: str, layers: int | None) -> None:
    cmd = ["export-backbone", model, "--random-init", "--out", str(engine), "--quiet", "--quant", "fp16",
           "--tap-formats", RUNGS]
    cmd += ["--tokenizer", str(TOKENIZER)] if TOKENIZER.is_dir() else []
    cmd += ["--set", f"num_hidden_layers={layers}"] if layers else []
    subprocess.run(cmd, check=True)


def one_run(bb, examples, dev, task, url: str, rule: str, a, side: Path) -> dict:
    from mobillm.edge_runtime.predict import JointModel
    from mobillm.edge_runtime.stream import StreamClient, TrainOptions

    opts = TrainOptions(server=url, batch_size=a.batch_size, max_len=a.max_len, mode="tokens", bits=f"auto:{rule}",
                        latency_target_s=a.latency_target, run=f"{rule}-{url.rsplit(':', 1)[1].strip('/')}",
                        progress=False, side_out=str(side), prefetch=1)  # plan close to the sends it follows
    client = StreamClient(bb, examples, task, opts)
    client.planner.every = 2
    stats = client.run()
    for h in stats.bit_plans:
        print(f"  batch {h['batch']}: {h['bandwidth_Bps'] / 1e6:.2f} MB/s, budget {h['budget_bytes'] / 1e3:.0f} KB -> "
              f"{'/'.join(h['plan'])}", file=sys.stderr)
    client.save_model(side)
    acc = JointModel(bb, side).evaluate(dev, task, a.max_len, a.batch_size, progress=False)
    plans = [h["plan"] for h in stats.bit_plans]
    distinct = [p for i, p in enumerate(plans) if i == 0 or p != plans[i - 1]]
    measured = sorted(h["bandwidth_Bps"] for h in stats.bit_plans) or [0.0]
    return {"plan": plans[-1] if plans else client.planner.plan, "plans": distinct, "mix": format_mix(plans),
            "replans": len(plans), "batches": stats.batches_sent,
            "measured_MBps": measured[len(measured) // 2] / 1e6,
            "bytes_per_batch": stats.bytes_sent / max(stats.batches_sent, 1),
            "send_s_per_batch": stats.send_s / max(stats.batches_sent, 1),
            "stream_s": stats.stream_s, "accuracy": acc.get("accuracy", next(iter(acc.values())))}


def format_mix(plans: list[list[str]]) -> str:
    """Share of each format over every re-plan and tap, e.g. "int4 86%, fp8 9%, int8 5%", cheapest first."""
    counts = Counter(f for plan in plans for f in plan)
    total = sum(counts.values()) or 1
    return ", ".join(f"{f} {100 * counts[f] / total:.0f}%" for f in RUNGS.split(",") if counts[f])


def plans_seen(distinct: list[list[str]], replans: int) -> str:
    """The chain of plans a run went through, or how often it changed when that chain is long."""
    if len(distinct) <= 4:
        return " → ".join("/".join(p) for p in distinct)
    return f"{len(distinct) - 1} changes in {replans} re-plans"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="opt-125m", help="export-backbone model (random init)")
    p.add_argument("--layers", type=int, default=4, help="num_hidden_layers override (fewer: cheaper)")
    p.add_argument("--engine", type=Path, default=None, help="reuse an engine exported with --tap-formats " + RUNGS)
    p.add_argument("--rows", type=int, default=256, help="SST-2 training rows per run")
    p.add_argument("--dev-rows", type=int, default=200, help="SST-2 dev rows scored after each run")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-len", type=int, default=64)
    p.add_argument("--mbps", default="10,60,100", help="uplink rates, Mbit/s, comma-separated")
    p.add_argument("--latency-target", type=float, default=0.05, help="seconds one batch may take on the uplink")
    p.add_argument("--threads", type=int, default=1, help="ORT threads on the device")
    p.add_argument("--queue", type=int, default=1, help="server credits (batches in flight); the device's "
                                                        "wire s/batch counts the credit wait")
    a = p.parse_args()

    from mobillm.common.tasks import get_task
    from mobillm.edge_runtime.backbone import Backbone
    from mobillm.edge_runtime.data import load_examples

    task = get_task("sst2")
    examples = load_examples(SST2 / "train.tsv", task, limit=a.rows)
    dev = load_examples(SST2 / "dev.tsv", task, limit=a.dev_rows)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        engine = a.engine
        if engine is None:
            engine = tmp / "engine"
            export(engine, a.model, a.layers)
        bb = Backbone(engine, threads=a.threads)
        with TrainerServe(tmp / "runs", "--threads", "1", "--bitplan-every", "4", "--queue", a.queue) as server:
            for mbps in [float(m) for m in a.mbps.split(",")]:
                for rule in ("utility", "paper"):
                    proxy = LinkProxy(server.port, rate=mbps * 1e6 / 8)
                    url = f"ws://127.0.0.1:{proxy.start()}/"
                    t0 = time.perf_counter()
                    try:
                        r = one_run(bb, examples, dev, task, url, rule, a, tmp / f"side-{rule}-{mbps}.onnx")
                    finally:
                        proxy.stop()
                    results.append((mbps, rule, r, time.perf_counter() - t0))
                    print(f"{mbps:g} Mbps {rule}: {r}", file=sys.stderr)
    m = bb.manifest
    made = f"{a.model} random-init" if a.engine is None else \
        f"{a.engine} ({(m.export_options or {}).get('model', m.model_id)})"
    print(f"\nengine {made}, {m.num_layers} layers, {len(m.taps)} taps, SST-2 {len(examples)} "
          f"train / {len(dev)} dev rows, batch {a.batch_size}, tokens mode, latency target {a.latency_target}s, "
          f"server queue {a.queue}")
    print("| Mbps | rule | bits per tap (last plan) | formats over all re-plans | plans seen | measured MB/s | "
          "KB/batch | wire s/batch | dev acc | run s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for mbps, rule, r, wall in results:
        seen = plans_seen(r["plans"], r["replans"])
        print(f"| {mbps:g} | {rule} | {'/'.join(r['plan'])} | {r['mix']} | {seen} | {r['measured_MBps']:.2f} | "
              f"{r['bytes_per_batch'] / 1e3:.0f} | "
              f"{r['send_s_per_batch']:.3f} | {r['accuracy']:.3f} | {wall:.0f} |")


if __name__ == "__main__":
    sys.exit(main())
