"""Each method's dev metric per value of a column of the dev file, from a parity run's saved predictions.

    python -m mobillm.bench.paper.by_column --work /tmp/glue-work/stsb/seed-0 --column genre \
        --out docs/runs/glue-gemma/stsb/by_genre.json

A bench/paper/compare.py run keeps, in its --work folder, the rows it scored (`dev.tsv`, in order)
and each worker's per-row dev predictions: the torch baselines' at every evaluation (`<method>.result.json`,
`curve[*].dev_pred`), the server-side methods' from the evaluation worker (`evaluate.result.json`,
`dev_preds`, one list per snapshot or returned network, in `evaluate.spec.json`'s item order). This
scores each method's **last** scored point (what the report calls the metric after the budget) on all
rows and on the rows of every value of `--column`, with the task's own metric.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np


def last_predictions(work: Path) -> dict[str, list]:
    """{method: per-row dev predictions of its last scored point}."""
    out = {}
    for path in sorted(work.glob("*.result.json")):
        method = path.name[: -len(".result.json")]
        curve = [p for p in json.loads(path.read_text()).get("curve", []) if p.get("dev_pred") is not None]
        if curve:
            out[method] = curve[-1]["dev_pred"]
    evaluated = work / "evaluate.result.json"
    if evaluated.is_file():
        items = json.loads((work / "evaluate.spec.json").read_text())["items"]
        for item, preds in zip(items, json.loads(evaluated.read_text())["dev_preds"]):
            where = Path(item.get("onnx") or item["folder"])
            method = where.stem if "onnx" in item else where.parent.name
            if preds is not None:
                out[method] = preds  # items run in time order: the last one of a method stays
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, required=True, help="a compare run's --work folder (one seed)")
    p.add_argument("--column", required=True, help="a column of the dev file, e.g. genre")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    from mobillm.common import tasks

    spec = json.loads((a.work / "evaluate.spec.json").read_text())["task"] if (a.work / "evaluate.spec.json").is_file() \
        else json.loads(next(a.work.glob("*.spec.json")).read_text())["task"]
    metric = tasks.METRICS[spec["metric"]]  # the predictions are saved as classes / values, as the metrics take them
    labels = np.load(a.work / "data.npz")["dev_labels"]
    with open(a.work / "dev.tsv", newline="", encoding="utf-8-sig") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    if not rows or a.column not in rows[0]:
        raise SystemExit(f"--column {a.column}: not a column of {a.work / 'dev.tsv'}")
    values = np.array([r[a.column] for r in rows])[: len(labels)]
    groups = sorted(set(values))
    result: dict = {"work": str(a.work), "column": a.column, "metric": spec["metric"],
                    "rows": {g: int(np.sum(values == g)) for g in groups}, "methods": {}}
    for method, preds in sorted(last_predictions(a.work).items()):
        pred = np.asarray(preds, dtype=np.float64 if spec["kind"] == "regression" else np.int64)
        score = {"all": float(metric(pred, labels))}
        score.update({g: float(metric(pred[values == g], labels[values == g])) for g in groups})
        result["methods"][method] = score
    print(f"| method | all ({len(labels)}) | " + " | ".join(f"{g} ({result['rows'][g]})" for g in groups) + " |")
    print("|---|---|" + "---|" * len(groups))
    for method, score in result["methods"].items():
        print(f"| {method} | {score['all']:.3f} | " + " | ".join(f"{score[g]:.3f}" for g in groups) + " |")
    if a.out:
        a.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
