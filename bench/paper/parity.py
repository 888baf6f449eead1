"""Accuracy parity over seeds (issue 26, item 4): bench/paper/compare.py once per seed, then mean ± sd per
method and a paired bootstrap CI of the difference to LoRA.

    python -m mobillm.bench.paper.parity --seeds 0,1,2 --methods lora,mobillm-cache --once lst,mobillm-local \
        --out docs/runs/parity -- --engine ENGINE --task sst2 --train-rows 4000 --dev-rows 872 ...

Everything after `--` goes to bench/paper/compare.py unchanged. Each seed is one compare.py run with
`--seed K --data-seed D`: the seed changes the side network's / LoRA's initialisation and the data
order, the rows (train, holdout, dev) stay those of `--data-seed`. `--once` methods run after the
seeds, in one more compare.py run with the first seed. Every method's reported result is its dev
metric at the evaluation with the best holdout metric (compare.py `--holdout-rows`: early stopping on
train rows, the same rule for every method), beside its dev metric after the budget.

The difference `--versus` (default mobillm-cache) − `--reference` (default lora) is paired by dev
example: each method's per-example correctness at its chosen point is averaged over its seeds, and
the examples are resampled (`--bootstrap` times) for a 95 % percentile interval of the mean
difference. The time to `--target-frac` x the reference's best dev metric (mean over its seeds of the
best evaluation in the budget) is the first evaluation at or above it, averaged over seeds.
Results: OUT/parity.json, OUT/parity.md, and each run's compare.py summary (OUT/seed-K.json, .md).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

COMPARE = ["-m", "mobillm.bench.paper.compare"]


def paired_bootstrap(a: np.ndarray, b: np.ndarray, n: int = 10_000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of a - b over examples and its 95 % percentile bootstrap interval (examples resampled,
    a and b kept paired). a, b: per-example scores (e.g. correctness averaged over seeds)."""
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    rng = np.random.default_rng(seed)
    means = np.empty(n)
    for start in range(0, n, 1000):  # chunks: 1000 x examples at a time
        k = min(1000, n - start)
        means[start:start + k] = d[rng.integers(0, len(d), (k, len(d)))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(d.mean()), float(lo), float(hi)


def mean_sd(values: list[float]) -> tuple[float | None, float | None]:
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None
    return float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else None


def first_at(curve: list, target: float) -> float | None:
    return next((t for t, m in curve if m >= target), None)


def last_below(curve: list, target: float) -> float | None:
    """The last evaluation before `first_at` (0 when the first one is already at the target): the
    method crossed the target after it, so (last_below, first_at] brackets its true time."""
    first = first_at(curve, target)
    if first is None:
        return None
    return max((t for t, m in curve if t < first), default=0.0)


def lr_text(lrs: list[float]) -> str:
    """One lr, or each seed's when they differ (a --cache-select run chooses its own)."""
    return f"{lrs[0]:g}" if len(set(lrs)) == 1 else "/".join(f"{lr:g}" for lr in lrs)


def aggregate(runs: list[dict], reference: str = "lora", versus: str = "mobillm-cache", target_frac: float = 0.95,
              bootstrap: int = 10_000) -> dict:
    """Per-method statistics over the runs' compare.py summaries, the paired differences to
    `reference`, time to target and the goals."""
    per: dict[str, list[dict]] = {}
    for run in runs:
        for row in run["summary"]["rows"]:
            if row.get("error") or row.get("metric_at_holdout_best") is None:
                continue
            per.setdefault(row["method"], []).append({**row, "seed": run["seed"], "loadavg": run["loadavg"]})
    methods = {}
    for m, rows in per.items():
        chosen, after = mean_sd([r["metric_at_holdout_best"] for r in rows]), mean_sd([r["metric_after_budget"] for r in rows])
        methods[m] = {"seeds": [r["seed"] for r in rows], "chosen": [r["metric_at_holdout_best"] for r in rows],
                      "chosen_mean": chosen[0], "chosen_sd": chosen[1],
                      "after_budget": [r["metric_after_budget"] for r in rows], "after_mean": after[0], "after_sd": after[1],
                      "chosen_t": [r["holdout_choice"]["t"] for r in rows],
                      "best_dev": [r["best_dev_in_budget"] for r in rows],
                      "threads": rows[0]["threads"], "lr": rows[0]["lr"], "lrs": [r["lr"] for r in rows],
                      "schedule_cut": [r["schedule_cut"] for r in rows], "epochs": [r["epochs"] for r in rows],
                      "epochs_rule": [r.get("epochs_rule") for r in rows],
                      "samples_per_s": [r.get("samples_per_s") for r in rows],
                      "samples_trained": [r.get("samples_trained") for r in rows],
                      "loadavg_1min": [r.get("loadavg_1min") for r in rows]}
    diffs = {}
    ref_rows = per.get(reference, [])
    ref_correct = [r["dev_correct_at_holdout_best"] for r in ref_rows if r.get("dev_correct_at_holdout_best")]
    for m, rows in per.items():
        correct = [r["dev_correct_at_holdout_best"] for r in rows if r.get("dev_correct_at_holdout_best")]
        if m == reference or not correct or not ref_correct:
            continue
        mean, lo, hi = paired_bootstrap(np.mean(correct, axis=0), np.mean(ref_correct, axis=0), bootstrap)
        diffs[m] = {"mean": mean, "lo": lo, "hi": hi, "seeds": len(correct), "reference_seeds": len(ref_correct)}
    timing = None
    if reference in methods and versus in methods:
        target = target_frac * float(np.mean(methods[reference]["best_dev"]))
        t_ref = [first_at(r["dev_curve"], target) for r in ref_rows]
        t_vs = [first_at(r["dev_curve"], target) for r in per[versus]]
        ratio = (float(np.mean(t_vs)) / float(np.mean(t_ref)) if None not in t_ref + t_vs and np.mean(t_ref) > 0
                 else None)
        # Evaluations are points on a grid: each time is bracketed by (last evaluation below, first at or
        # above], so the ratio lies between these bounds (the one above is the figure to hold to the goal)
        lo_ref = [last_below(r["dev_curve"], target) for r in ref_rows]
        lo_vs = [last_below(r["dev_curve"], target) for r in per[versus]]
        bounds = None
        if ratio is not None and None not in lo_ref + lo_vs:
            upper = float(np.mean(t_vs)) / float(np.mean(lo_ref)) if np.mean(lo_ref) > 0 else None
            bounds = [float(np.mean(lo_vs)) / float(np.mean(t_ref)), upper]
        timing = {"target": target, "reference_s": t_ref, "versus_s": t_vs, "ratio": ratio,
                  "reference_last_below_s": lo_ref, "versus_last_below_s": lo_vs, "ratio_bounds": bounds}
    metric = next((run["summary"].get("metric") for run in runs if run["summary"].get("metric")), "accuracy")
    goals = []
    if versus in methods and reference in methods:
        gap = methods[versus]["chosen_mean"] - methods[reference]["chosen_mean"]  # in the task's metric
        goals.append({"goal": f"{versus} mean >= {reference} mean - 1.0 point ({metric})", "value": gap,
                      "met": gap >= -0.01})
    if versus in diffs and metric == "accuracy":  # the bootstrap resamples per-example correctness
        d = diffs[versus]
        goals.append({"goal": f"95 % CI of {versus} - {reference} excludes -2.0 points", "value": d["lo"],
                      "met": d["lo"] > -0.02})
    if timing is not None:
        goals.append({"goal": f"time to {target_frac} x {reference} best: {versus} / {reference} <= 0.4",
                      "value": timing["ratio"], "met": None if timing["ratio"] is None else timing["ratio"] <= 0.4})
    return {"reference": reference, "versus": versus, "metric": metric, "methods": methods, "differences": diffs,
            "timing": timing,
            "goals": goals, "runs": [{k: v for k, v in run.items() if k != "summary"} for run in runs]}


def pct(v, sign: bool = False) -> str:
    return "—" if v is None else f"{100 * v:+.1f}" if sign else f"{v:.3f}"


def markdown(agg: dict) -> str:
    ref, metric = agg["reference"], agg.get("metric", "accuracy")
    lines = [f"| method | seeds | cores | peak lr | dev {metric} at holdout-best point (mean ± sd) | per seed | "
             f"dev {metric} after budget (mean ± sd) | chosen at (s) | schedule | samples trained / s (samples) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for m, r in agg["methods"].items():
        sd = "" if r["chosen_sd"] is None else f" ± {r['chosen_sd']:.3f}"
        sd_after = "" if r["after_sd"] is None else f" ± {r['after_sd']:.3f}"
        cut = [c for c in r["schedule_cut"] if c]
        sched = (f"{'/'.join(str(e) for e in r['epochs'])} epochs; " if any(r["epochs"]) else "lr to 0 at the budget; ") + \
            (f"**cut at the budget in {len(cut)} of {len(r['schedule_cut'])}**" if cut else "ended in the budget")
        sps = [v for v in r["samples_per_s"] if v]
        trained = [v for v in r.get("samples_trained", []) if v]
        rate = (f"{np.mean(sps):.1f}" if sps else "—") + (f" ({np.mean(trained):,.0f})" if trained else "")
        lines.append(f"| {m} | {len(r['seeds'])} | {r['threads']} | {lr_text(r.get('lrs') or [r['lr']])} | {r['chosen_mean']:.3f}{sd} | "
                     f"{', '.join(f'{v:.3f}' for v in r['chosen'])} | {pct(r['after_mean'])}{sd_after} | "
                     f"{', '.join(f'{t:.0f}' for t in r['chosen_t'])} | {sched} | {rate} |")
    lines += ["", f"Difference to {ref} (dev accuracy points at each method's holdout-best point; paired by dev "
                  f"example, per-example correctness averaged over seeds, 95 % bootstrap CI"
                  + ("" if metric == "accuracy" else f"; accuracy, not the task's {metric}") + "):", ""]
    for m, d in agg["differences"].items():
        lines.append(f"- {m} − {ref}: **{pct(d['mean'], True)}** [{pct(d['lo'], True)}, {pct(d['hi'], True)}] "
                     f"({d['seeds']} vs {d['reference_seeds']} seeds)")
    t = agg["timing"]
    if t:
        fmt = lambda xs: ", ".join("not reached" if x is None else f"{x:.0f}" for x in xs)  # noqa: E731
        lines += ["", f"Time to 0.95 × {ref}'s best dev {metric} ({t['target']:.3f}): {ref} {fmt(t['reference_s'])} s, "
                      f"{agg['versus']} {fmt(t['versus_s'])} s -> ratio "
                      f"**{'—' if t['ratio'] is None else format(t['ratio'], '.2f')}**."]
        b = t.get("ratio_bounds")
        if b:
            lines[-1] += (f" Each time lies after the method's last evaluation below the target ({ref} "
                          f"{fmt(t['reference_last_below_s'])} s, {agg['versus']} {fmt(t['versus_last_below_s'])} s), "
                          f"so the true ratio is between {b[0]:.2f} and "
                          f"{'unbounded' if b[1] is None else format(b[1], '.2f')}.")
    lines += ["", "| goal | measured | met |", "|---|---|---|"]
    for g in agg["goals"]:
        v = g["value"]
        shown = "—" if v is None else f"{v:.2f}" if "time" in g["goal"] else pct(v, True) + " points"
        lines.append(f"| {g['goal']} | {shown} | {'—' if g['met'] is None else 'yes' if g['met'] else '**no**'} |")
    lines += ["", "| run | seed | methods | minutes | load average (1, 5, 15 min) before -> after |", "|---|---|---|---|---|"]
    for run in agg["runs"]:
        la = run["loadavg"]
        lines.append(f"| {run['tag']} | {run['seed']} | {','.join(run['methods'])} | {run['minutes']:.1f} | "
                     f"{' '.join(f'{x:.1f}' for x in la[0])} -> {' '.join(f'{x:.1f}' for x in la[1])} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    rest = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0,1,2", help="comma list of seeds (init and data order)")
    p.add_argument("--data-seed", type=int, default=0, help="the rows (train, holdout, dev) of every run")
    p.add_argument("--methods", default="lora,mobillm-cache", help="methods run once per seed")
    p.add_argument("--once", default="lst,mobillm-local", help="methods run once, with the first seed ('' for none)")
    p.add_argument("--reference", default="lora")
    p.add_argument("--versus", default="mobillm-cache")
    p.add_argument("--target-frac", type=float, default=0.95)
    p.add_argument("--bootstrap", type=int, default=10_000, help="bootstrap resamples")
    p.add_argument("--out", type=Path, required=True, help="parity.json, parity.md and each run's summary")
    p.add_argument("--work-root", type=Path, default=None, help="compare.py work folders (default: OUT/work)")
    p.add_argument("--jobs", type=int, default=1, help="compare.py runs at a time (above 1 they share the CPU: "
                                                       "every method of every run meets the same contention)")
    p.add_argument("--aggregate-only", action="store_true",
                   help="rebuild parity.json / parity.md from the runs already in OUT (their TAG.json); nothing runs")
    p.add_argument("--rows-from", type=Path, default=None,
                   help="with --aggregate-only: a rerun's OUT; its methods' rows replace these runs' rows of the same "
                        "tag (a method rerun on its own, e.g. at another load)")
    a = p.parse_args(own)
    seeds = [int(x) for x in a.seeds.split(",") if x.strip()]
    a.out.mkdir(parents=True, exist_ok=True)
    work_root = a.work_root or a.out / "work"
    plan = [(f"seed-{k}", k, a.methods.split(",")) for k in seeds]
    if a.once.strip():
        plan.append(("once", seeds[0], a.once.split(",")))
    runs, failed, lock = [], [], threading.Lock()

    def one(tag: str, seed: int, methods: list[str]) -> None:
        cmd = [sys.executable, *COMPARE, *rest, "--seed", str(seed), "--data-seed", str(a.data_seed),
               "--methods", ",".join(methods), "--work", str(work_root / tag), "--json-out", str(a.out / f"{tag}.json"),
               "--markdown-out", str(a.out / f"{tag}.md"), "--plot", str(a.out / f"{tag}.png")]
        print(f"[parity {time.strftime('%H:%M:%S')}] {tag}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
        t0, load0 = time.monotonic(), os.getloadavg()
        with open(a.out / f"{tag}.log", "w") as log:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
        load1, minutes = os.getloadavg(), (time.monotonic() - t0) / 60
        print(f"[parity {time.strftime('%H:%M:%S')}] {tag}: rc {rc}, {minutes:.1f} min, load {load0} -> {load1}",
              file=sys.stderr, flush=True)
        out = a.out / f"{tag}.json"
        with lock:
            if rc != 0:
                failed.append(tag)
            if not out.is_file():
                return
            runs.append({"tag": tag, "seed": seed, "methods": methods, "rc": rc, "minutes": minutes,
                         "loadavg": [list(load0), list(load1)], "command": " ".join(cmd[1:]),
                         "summary": json.loads(out.read_text())})
            runs.sort(key=lambda r: [x[0] for x in plan].index(r["tag"]))
            agg = aggregate(runs, a.reference, a.versus, a.target_frac, a.bootstrap)  # after every run: partial
            agg["command"] = "python -m mobillm.bench.paper.parity " + " ".join(argv)
            agg["jobs"] = a.jobs
            (a.out / "parity.json").write_text(json.dumps(agg, indent=1, default=str))
            (a.out / "parity.md").write_text(markdown(agg) + "\n")

    if a.aggregate_only:
        before = json.loads((a.out / "parity.json").read_text()) if (a.out / "parity.json").is_file() else {}
        known = {r["tag"]: r for r in before.get("runs", [])}
        for tag, seed, methods in plan:
            if (a.out / f"{tag}.json").is_file():
                run = known.get(tag, {"tag": tag, "seed": seed, "methods": methods, "rc": None, "minutes": float("nan"),
                                      "loadavg": [[float("nan")] * 3] * 2, "command": None})
                summary = json.loads((a.out / f"{tag}.json").read_text())
                other = a.rows_from / f"{tag}.json" if a.rows_from else None
                if other is not None and other.is_file():
                    new_rows = {r["method"]: r for r in json.loads(other.read_text())["rows"]}
                    summary["rows"] = [new_rows.get(r["method"], r) for r in summary["rows"]]
                    run = {**run, "rows_from": str(other)}
                runs.append({**run, "summary": summary})
        agg = aggregate(runs, a.reference, a.versus, a.target_frac, a.bootstrap)
        agg["command"], agg["jobs"] = before.get("command"), before.get("jobs")
        name = "parity" if a.rows_from is None else f"parity-rows-from-{a.rows_from.name}"
        (a.out / f"{name}.json").write_text(json.dumps(agg, indent=1, default=str))
        (a.out / f"{name}.md").write_text(markdown(agg) + "\n")
        print(markdown(agg))
        return 0 if runs else 1
    with ThreadPoolExecutor(max(1, a.jobs)) as pool:
        list(pool.map(lambda job: one(*job), plan))
    if (a.out / "parity.md").is_file():
        print((a.out / "parity.md").read_text())
    return 1 if failed or not runs else 0  # (each run's log: OUT/TAG.log)


if __name__ == "__main__":
    sys.exit(main())
