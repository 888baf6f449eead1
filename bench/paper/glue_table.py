"""The paper's Table III and Table IV from `bench/paper/compare.py --json-out` summaries of several tasks.

    python -m mobillm.bench.paper.glue_table sst2.json mrpc.json cola.json stsb.json

Table III: each task's dev metric after the budget per method (accuracy, F1, Matthews or
Pearson, x100), and the average over the tasks the method ran on (a method missing a task gets
no average). Table IV: device peak RSS and device seconds per iteration, from each task's run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

METRIC_NAMES = {"accuracy": "acc", "f1": "F1", "matthews": "MCC", "pearson": "Pearson"}


def load(paths: list[Path]) -> list[dict]:
    return [json.loads(Path(p).read_text()) for p in paths]


def methods_in_order(summaries: list[dict]) -> list[str]:
    seen: list[str] = []
    for s in summaries:
        seen += [r["method"] for r in s["rows"] if r["method"] not in seen]
    return seen


def table_iii(summaries: list[dict]) -> str:
    tasks = [f"{s['task']} ({METRIC_NAMES.get(s['metric'], s['metric'])}, {s['dev_rows']} dev)" for s in summaries]
    lines = ["| method | " + " | ".join(tasks) + " | average |", "|---" * (len(tasks) + 2) + "|"]
    for m in methods_in_order(summaries):
        values = []
        for s in summaries:
            row = next((r for r in s["rows"] if r["method"] == m), None)
            values.append(None if row is None else row.get("metric_after_budget"))
        cells = ["—" if v is None else f"{100 * v:.1f}" for v in values]
        avg = "—" if any(v is None for v in values) else f"{100 * sum(values) / len(values):.1f}"
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {avg} |")
    return "\n".join(lines)


def table_iv(summaries: list[dict]) -> str:
    lines = ["| task | method | device peak RSS (MiB) | x LoRA | device s/iter | samples trained / s |",
             "|---|---|---|---|---|---|"]
    for s in summaries:
        lora = next((r.get("peak_rss_mb") for r in s["rows"] if r["method"] == "lora"), None)
        for r in s["rows"]:
            mb = r.get("peak_rss_mb")
            ratio = f"{mb / lora:.2f}" if mb and lora else "—"
            sps = r.get("samples_per_s")
            lines.append(f"| {s['task']} | {r['method']} | {mb:.0f} | {ratio} | {r.get('device_s_per_iter') or 0:.3f} | "
                         f"{sps:.1f} |" if mb else f"| {s['task']} | {r['method']} | — | — | — | — |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("summaries", nargs="+", type=Path, help="compare.py --json-out files, one per task")
    a = p.parse_args(argv)
    summaries = load(a.summaries)
    print("Table III: dev metric after the budget (x100)\n")
    print(table_iii(summaries))
    print("\nTable IV: device memory and compute\n")
    print(table_iv(summaries))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
