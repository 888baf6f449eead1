"""bench/paper/compare.py's report: the summary (per-method numbers, the target, the goals), the
markdown table, the JSON and the plot, from the workers' results.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import numpy as np

from mobillm.bench.paper.compare_config import BYTES_GOAL, GOALS, METHODS, Settings
from mobillm.bench.paper.compare_curves import (holdout_choice, in_budget, metric_after_budget, time_to_stay,
                                                time_to_target)
from mobillm.bench.paper.paper_bytes import paper_scheme_bytes, wire_bytes_per_sample


def summarize(s: Settings, data: dict, results: dict) -> dict:
    """Per-method rows, the target, whether anything learned beyond noise, bytes and goals."""
    budget, methods = s.budget_s, list(s.methods)
    finals = {m: metric_after_budget(results[m].get("curve", []), budget) for m in methods}
    best_method = max((m for m in methods if finals[m] is not None), key=lambda m: finals[m], default=None)
    best = finals[best_method] if best_method else None
    target = s.target_frac * best if best is not None else None
    start = {m: next((pt["metric"] for pt in results[m].get("curve", []) if pt["t"] == 0
                      and pt.get("metric") is not None), None) for m in methods}
    # Is there anything to time? The best method must beat the best untrained metric by more than
    # two binomial standard errors of an accuracy on this many dev rows (0.5 / sqrt(n) at most).
    noise = 2 * 0.5 / math.sqrt(max(1, data["dev_rows"])) if data["task"]["metric"] == "accuracy" else None
    start_best = max((v for v in start.values() if v is not None), default=None)
    signal = None if best is None or start_best is None or noise is None else best - start_best > noise
    # Methods whose untrained metric already meets the target: their time to target is 0 and says nothing.
    at_zero = [m for m in methods if start[m] is not None and target is not None and start[m] >= target]
    dev_labels = np.load(data["data"])["dev_labels"] if data.get("data") and Path(data["data"]).is_file() else None
    rows = []
    for m in methods:
        r = results[m]
        ttt = time_to_target(r.get("curve", []), target, budget) if target is not None else None
        stopping = early_stopping(s, m, r, dev_labels, data["task"].get("kind", "class"))
        if METHODS[m].server and "t_model" in r:  # the server trained them; the run ends when the model is back
            trained, train_s = r["stats"]["server_metrics"].get("samples_trained"), r["t_model"] - r["t0"]
        else:
            trained, train_s = r.get("samples"), max((p["t"] for p in r.get("curve", [])), default=None)
        rows.append({"method": m, "description": METHODS[m].description, "peak_rss_mb": r.get("peak_rss_mb"),
                     "loadavg_1min": r.get("loadavg_1min"),
                     "device_s_per_iter": r.get("device_s_per_iter"),
                     "device_cpu_s_per_iter": r.get("device_cpu_s_per_iter"), "bytes_per_sample": r.get("bytes_per_sample"),
                     "bytes_sent": r.get("bytes_sent"), "steps": r.get("steps"), "samples": r.get("samples"),
                     "samples_trained": trained, "train_s": train_s,
                     "samples_per_s": trained / train_s if trained and train_s else None,
                     "metric_after_budget": finals[m], "time_to_target_s": ttt,
                     "by_split_after_budget": metric_after_budget(r.get("curve", []), budget, "by_split"),
                     "time_to_stay_s": time_to_stay(r.get("curve", []), target, budget) if target is not None else None,
                     "error": r.get("error"), **stopping,
                     "curve": [{k: v for k, v in p.items() if k != "dev_pred"} for p in r.get("curve", [])]})
    by = {row["method"]: row for row in rows}
    taps = data["manifest"].taps
    padded = wire_bytes_per_sample(taps, 256, "tokens")
    padded_fp16 = wire_bytes_per_sample(taps, 256, "tokens", "fp16")
    pooled_calc = wire_bytes_per_sample(taps, 1, "pooled", rows=s.batch_size)
    pooled_meas = (by.get("mobillm-pooled") or {}).get("bytes_per_sample")
    manifest = data["manifest"]
    every_layer = paper_scheme_bytes(manifest.num_layers, manifest.config.get("hidden_size", taps[0].hidden))
    bytes_cmp = {"paper_every_layer_fp16": every_layer, "ratio_every_layer": every_layer / (pooled_meas or pooled_calc),
                 "padded256_engine_fmt": padded, "padded256_fp16": padded_fp16, "pooled_computed": pooled_calc,
                 "pooled_measured": pooled_meas, "tap_format": ",".join(sorted({t.fmt for t in taps})),
                 "ratio": padded / (pooled_meas or pooled_calc), "ratio_fp16": padded_fp16 / (pooled_meas or pooled_calc)}
    goals = []

    def ratio_goal(name, num_m, den_m, key, limit):
        num, den = by.get(num_m, {}).get(key), by.get(den_m, {}).get(key)
        if num_m not in by or den_m not in by:
            return
        untrained = [m for m in (num_m, den_m) if m in at_zero]
        if key == "time_to_target_s" and (signal is False or untrained):
            why = ("no method learned beyond noise" if signal is False else
                   f"the target is not above the untrained metric of {' and '.join(untrained)}")
            value, text, ok = None, f"not measurable ({why})", None
        elif key == "time_to_target_s" and num is not None and den is None:
            value, text = num / budget, f"< {num / budget:.2f} ({den_m} missed the target in the budget)"
            ok = value <= limit
        elif num is None or den is None or not den:
            value, text, ok = None, f"n/a ({num_m} {'missed the target' if num is None else '?'})", False
        else:
            value = num / den
            text, ok = f"{value:.2f}", value <= limit
        goals.append({"goal": name, "limit": limit, "value": value, "text": text, "met": ok})

    for g in GOALS:
        ratio_goal(g.name, g.numerator, g.denominator, g.key, g.limit)
    name, at_least = BYTES_GOAL
    goals.append({"goal": name, "limit": at_least, "value": bytes_cmp["ratio"],
                  "text": f"{bytes_cmp['ratio']:.0f}x", "met": bytes_cmp["ratio"] >= at_least, "at_least": True})
    return {"model": s.model, "task": s.task, "batch_size": s.batch_size, "max_len": s.max_len,
            "budget_s": budget, "train_rows": data["train_rows"], "dev_rows": data["dev_rows"],
            "holdout_rows": data.get("holdout_rows", 0), "data_seed": s.subset_seed,
            "threads": s.threads, "server_threads": s.server_threads, "loadavg_end": list(os.getloadavg()),
            "overrides": list(s.overrides), "seed": s.seed, "target_frac": s.target_frac, "best_method": best_method,
            "best_metric": best, "target": target, "metric": data["task"]["metric"], "rows": rows,
            "start_metrics": start, "start_best": start_best, "at_zero": at_zero, "noise": noise, "signal": signal,
            "bytes": bytes_cmp, "goals": goals, "split_layer": s.split_layer, "link_mbps": s.link_mbps,
            "num_layers": data["manifest"].num_layers, "random_init": data["manifest"].source == "random-init",
            "mobillm_epochs": s.mobillm_epochs,
            "mean_train_tokens": data["mean_train_tokens"], "mean_padded_tokens": data["mean_padded_tokens"]}


def threads_used(s: Settings, method: str) -> str:
    """The cores a method's row used: one process, or a device and a server process for mobillm."""
    threads = s.threads or "default"
    if METHODS[method].server:
        return f"device {threads} + server {s.server_threads} thread(s), 2 processes"
    return f"{threads} thread(s), 1 process"


def early_stopping(s: Settings, method: str, r: dict, dev_labels, kind: str) -> dict:
    """The reported point (best holdout metric within the budget), its dev metric and per-example
    correctness, the best dev metric in the budget (for time-to-target), and whether the run's
    schedule was cut at the budget (a mobillm run whose declared epochs did not end within it)."""
    curve, budget = r.get("curve", []), s.budget_s
    choice = holdout_choice(curve, budget)
    correct = None
    if choice is not None and choice.get("dev_pred") is not None and dev_labels is not None and kind != "regression":
        correct = (np.asarray(choice["dev_pred"]) == dev_labels[: len(choice["dev_pred"])]).astype(int).tolist()
    cut = None
    if METHODS[method].server and "t_model" in r:
        cut = r["t_model"] - r["t0"] > budget
    elif "curve" in r:
        cut = False  # the time-budgeted workers decay their lr to 0 at the budget
    lr = getattr(s, METHODS[method].lr) if METHODS[method].lr else s.lr_side
    if r.get("selection"):  # --cache-select: the lr the server chose for its cached epochs
        lr = r["selection"]["lr"]
    scored = in_budget(curve, budget)
    return {"holdout_choice": None if choice is None else
            {"t": choice["t"], "step": choice.get("step"), "holdout": choice["holdout"], "metric": choice["metric"]},
            "metric_at_holdout_best": None if choice is None else choice["metric"],
            "dev_correct_at_holdout_best": correct,
            "best_dev_in_budget": max((p["metric"] for p in scored), default=None),
            "dev_curve": [(p["t"], p["metric"]) for p in scored],
            "schedule_cut": cut, "epochs": r.get("epochs"), "epochs_rule": r.get("epochs_rule"),
            "lr": lr, "threads": threads_used(s, method)}


def fmt_num(v, spec: str, none: str = "—") -> str:
    """`v` formatted, or `none` for a missing or non-finite number."""
    return none if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def markdown(s: dict) -> str:
    """The comparison table with its notes, bytes line and goals."""
    lines = [f"Target: {s['target_frac']:.2f} x best {s['metric']} after the budget "
             f"({s['best_method']}: {fmt_num(s['best_metric'], '.3f')}) = **{fmt_num(s['target'], '.3f')}**; "
             f"budget {s['budget_s']:.0f} s per method.", "",
             "| method | device peak RSS (MiB) | device s/iter | device CPU s/iter | bytes/sample on the link | "
             f"samples trained / s | {s['metric']} after budget | time to target (s) | stays above from (s) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in s["rows"]:
        if r["error"]:
            lines.append(f"| {r['method']} | failed: {r['error'][:80]} | | | | | | | |")
            continue
        lines.append(f"| {r['method']} | {fmt_num(r['peak_rss_mb'], '.0f')} | {fmt_num(r['device_s_per_iter'], '.3f')} | "
                     f"{fmt_num(r['device_cpu_s_per_iter'], '.3f')} | "
                     f"{fmt_num(r['bytes_per_sample'], ',.0f')} | {fmt_num(r['samples_per_s'], '.1f')} | "
                     f"{fmt_num(r['metric_after_budget'], '.3f')} | "
                     f"{fmt_num(r['time_to_target_s'], '.1f', 'not reached')} | "
                     f"{fmt_num(r.get('time_to_stay_s'), '.1f', 'not reached')} |")
    lines += split_table(s) + stopping_table(s)
    if s["at_zero"]:
        lines += ["", f"Note: the target is not above the untrained (t = 0) metric of {', '.join(s['at_zero'])}: "
                      f"their time to target is 0 and says nothing."]
    if s["signal"] is False:
        lines += ["", f"**No signal:** the best {s['metric']} after the budget ({s['best_metric']:.3f}) is within "
                      f"two standard errors (±{s['noise']:.3f} on {s['dev_rows']} rows) of the best untrained one "
                      f"({s['start_best']:.3f}); this run's {s['metric']} and time-to-target columns are noise."]
    b = s["bytes"]
    lines += ["", f"Bytes per sample, pooled: {fmt_num(b['pooled_measured'], ',.0f')} measured, "
                  f"{b['pooled_computed']:,.0f} computed. The paper's scheme (every layer, padded to 256 tokens, "
                  f"fp16; bench/paper/paper_bytes.py): {b['paper_every_layer_fp16']:,.0f} -> **{b['ratio_every_layer']:.0f}x** "
                  f"less. This engine's taps only, padded to 256 tokens, {b['tap_format']}: "
                  f"{b['padded256_engine_fmt']:,.0f} ({b['padded256_fp16']:,.0f} in fp16) -> **{b['ratio']:.0f}x** less "
                  f"({b['ratio_fp16']:.0f}x against fp16).", "",
              "| goal | limit | measured | met |", "|---|---|---|---|"]
    for g in s["goals"]:
        limit = f">= {g['limit']}x" if g.get("at_least") else f"<= {g['limit']}"
        met = "—" if g["met"] is None else "yes" if g["met"] else "**no**"
        lines.append(f"| {g['goal']} | {limit} | {g['text']} | {met} |")
    return "\n".join(lines)


def stopping_table(s: dict) -> list[str]:
    """Early stopping on the held-out train rows: each method's reported point, beside its metric after the budget."""
    if not any(r.get("holdout_choice") for r in s["rows"]):
        return []
    lines = ["", f"Early stopping on {s.get('holdout_rows')} held-out train rows (the same rule for every method: "
                 f"the evaluation with the best holdout {s['metric']}; learning rates are the documented defaults, "
                 f"not tuned on dev):", "",
             f"| method | cores | peak lr | chosen at (s) | holdout {s['metric']} | dev {s['metric']} there | "
             f"dev after budget | schedule |", "|---|---|---|---|---|---|---|---|"]
    for r in s["rows"]:
        c = r.get("holdout_choice")
        if r["error"] or not c:
            continue
        sched = ("cut at the budget (declared epochs did not end)" if r.get("schedule_cut") else
                 "ends at the budget" if r.get("epochs") is None else f"{r['epochs']} epochs, ended in the budget")
        lines.append(f"| {r['method']} | {r['threads']} | {r['lr']:g} | {c['t']:.1f} | {c['holdout']:.3f} | "
                     f"{c['metric']:.3f} | {fmt_num(r['metric_after_budget'], '.3f')} | {sched} |")
    return lines


def split_table(s: dict) -> list[str]:
    """A task with several dev splits (MNLI): each one's metric after the budget, per method."""
    splits = next((list(r["by_split_after_budget"]) for r in s["rows"] if r.get("by_split_after_budget")), None)
    if not splits:
        return []
    lines = ["", f"{s['metric']} after the budget on each dev split (the table above: {splits[0]}):", "",
             "| method | " + " | ".join(splits) + " |", "|---|" + "---|" * len(splits)]
    for r in s["rows"]:
        got = r.get("by_split_after_budget") or {}
        lines.append(f"| {r['method']} | " + " | ".join(fmt_num(got.get(k), '.3f') for k in splits) + " |")
    return lines


def plot(s: dict, path: Path) -> None:
    """Every method's dev metric against wall-clock, with the target and the budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 5))
    for r in s["rows"]:
        pts = [p for p in r["curve"] if p.get("metric") is not None]
        if not pts:
            continue
        ls = "-" if r["method"].startswith("mobillm") else "--"
        ax.plot([p["t"] for p in pts], [p["metric"] for p in pts], ls, marker="o", ms=3.5,
                color=METHODS[r["method"]].colour, label=r["method"])
    if s["target"] is not None:
        ax.axhline(s["target"], color="grey", lw=0.8, ls=":", label=f"target {s['target']:.3f}")
    ax.axvline(s["budget_s"], color="black", lw=0.6, ls=":")
    ax.set_xlabel("wall-clock training time (s), evaluation excluded")
    ax.set_ylabel(f"dev {s['metric']} ({s['dev_rows']} rows)")
    weights = "random init" if s["random_init"] else "real weights"
    ax.set_title(f"{s['model']} ({weights}) on {s['task']}: dev metric vs wall-clock, budget {s['budget_s']:.0f} s",
                 fontsize=10)
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(s: Settings, data: dict, results: dict, harness_s: float | None, argv) -> int:
    """Summary, table, JSON and plot of a finished run; exit status 1 when a method failed."""
    summary = summarize(s, data, results)
    summary["harness_s"] = harness_s
    summary["command"] = "python -m mobillm.bench.paper.compare " + " ".join(sys.argv[1:] if argv is None else argv)
    table = markdown(summary)
    print(table)
    if harness_s is not None:
        print(f"\nwhole run: {harness_s / 60:.1f} min", file=sys.stderr)
    if s.json_out:
        s.json_out.parent.mkdir(parents=True, exist_ok=True)
        s.json_out.write_text(json.dumps(summary, indent=2, default=str))
    if s.markdown_out:
        s.markdown_out.write_text(table + "\n")
    if s.plot:
        plot(summary, s.plot)
    return 0 if not any(r["error"] for r in summary["rows"]) else 1


def brief(r: dict) -> str:
    """One log line for a finished worker."""
    if "error" in r:
        return f"FAILED: {r['error']}"
    return (f"peak RSS {fmt_num(r.get('peak_rss_mb'), '.0f')} MiB, {fmt_num(r.get('device_s_per_iter'), '.3f')} s/iter, "
            f"{r.get('steps')} steps")
