"""bench/paper/compare.py on a task with two dev splits (MNLI: dev_matched, dev_mismatched), on the GLUE-layout
fixtures: the data holds both splits, every score is taken per split, and the report shows each."""

from pathlib import Path

import numpy as np
import pytest

from mobillm.bench.paper.compare_config import Settings
from mobillm.bench.paper.compare_data import prepare_data
from mobillm.bench.paper.compare_report import markdown, summarize
from mobillm.bench.paper.compare_workers import Data, dev_point

REPO = Path(__file__).resolve().parents[2]

MNLI = REPO / "tests" / "common" / "fixtures" / "glue" / "MNLI"


def test_dev_point_scores_each_split_on_its_own_rows():
    task = {"name": "mnli", "dev_splits": ["dev_matched", "dev_mismatched"]}
    outputs = np.eye(3)[[0, 1, 2, 0, 0]]
    labels, split = np.array([0, 1, 0, 1, 0]), np.array([0, 0, 0, 1, 1])
    point = dev_point(task, outputs, labels, split)
    assert point["by_split"] == pytest.approx({"dev_matched": 2 / 3, "dev_mismatched": 0.5})
    assert point["metric"] == point["by_split"]["dev_matched"]  # the headline is the matched split
    assert dev_point({"name": "sst2"}, np.eye(2)[[0, 1]], np.array([0, 0]), np.zeros(2, int)) == {"metric": 0.5}


def test_mnli_comparison_data_and_report_keep_matched_and_mismatched_apart(tiny_engine, tmp_path):
    s = Settings(task="mnli", data_dir=MNLI, train_rows=4, dev_rows=10, batch_size=2)
    data = prepare_data(s, tiny_engine, tmp_path)
    assert data["task"]["dev_splits"] == ["dev_matched", "dev_mismatched"]
    assert set(data["dev_files"]) == {"dev_matched", "dev_mismatched"} and data["dev_rows"] == 3 + 4
    d = Data(data["data"])
    assert np.bincount(d.dev_split).tolist() == [3, 4]
    assert sorted(d.dev_labels[d.dev_split == 1].tolist()) == [0, 1, 2, 2]
    assert sorted(d.train_labels.tolist()) == [0, 0, 1, 2]

    def run(matched, mismatched):
        return {"curve": [{"t": 1.0, "metric": matched, "step": 1, "final": True,
                           "by_split": {"dev_matched": matched, "dev_mismatched": mismatched}}],
                "peak_rss_mb": 100.0, "steps": 1, "samples": 2}

    s = Settings(task="mnli", methods=("lora", "lst"), budget_minutes=1 / 60)
    summary = summarize(s, data, {"lora": run(0.5, 0.25), "lst": run(0.75, 0.125)})
    rows = {r["method"]: r for r in summary["rows"]}
    assert rows["lst"]["by_split_after_budget"] == {"dev_matched": 0.75, "dev_mismatched": 0.125}
    table = markdown(summary)
    assert "| method | dev_matched | dev_mismatched |" in table
    assert "| lora | 0.500 | 0.250 |" in table and "| lst | 0.750 | 0.125 |" in table


def test_evaluate_worker_scores_matched_and_mismatched_on_the_device_path(tiny_engine, tmp_path):
    from mobillm.bench.paper.compare_workers import evaluate_worker

    from mobillm.common.manifest import Manifest, manifest_digest
    from mobillm.trainer.config import OptimConfig, RunConfig, SideConfig

    taps = Manifest.load(tiny_engine, verify=False).taps
    side = SideConfig().for_taps([t.hidden for t in taps], 3)
    RunConfig(run="init", task="mnli", task_type="class", num_labels=3, model_id="tiny",
              manifest_sha256=manifest_digest(tiny_engine), device_id="test", mode="pooled", epochs=1,
              samples_per_epoch=4, taps=[{"layer": t.layer, "hidden": t.hidden, "fmt": t.fmt,
                                          "block_size": t.block_size} for t in taps],
              cache=False, side=side, optim=OptimConfig()).save(tmp_path)
    out = evaluate_worker({"task": {"name": "mnli"}, "engine": str(tiny_engine), "max_len": 64, "batch_size": 4,
                           "items": [{"folder": str(tmp_path), "init": True}], "dev_file": "unused",
                           "dev_files": {s: str(MNLI / f"{s}.tsv") for s in ("dev_matched", "dev_mismatched")}})
    (scores,) = out["by_split"]
    assert list(scores) == ["dev_matched", "dev_mismatched"]
    assert out["metrics"] == [scores["dev_matched"]]
    # a constant-ish untrained head: each split's accuracy is a multiple of 1/3 and 1/4 (3 and 4 rows)
    assert round(scores["dev_matched"] * 3, 6) % 1 == 0 and round(scores["dev_mismatched"] * 4, 6) % 1 == 0


def test_a_run_whose_planned_batches_end_before_the_budget_is_scored_at_its_last_step(tiny_engine, tmp_path):
    """Tiny models on an idle machine can run every planned batch inside the budget: the run ends
    there, its last step is scored and counts as the budget's point (CI once saw lora with no point)."""
    from mobillm.bench.paper.compare_harness import Harness
    from mobillm.bench.paper.compare_workers import torch_worker

    s = Settings(task="qqp", data_dir=REPO / "tests" / "common" / "fixtures" / "glue" / "QQP",
                 train_rows=4, dev_rows=4, batch_size=2, budget_minutes=60.0, evals=1, no_zero_eval=True)
    data = prepare_data(s, tiny_engine, tmp_path)
    h = Harness(s, tmp_path, {"fp32": tiny_engine}, data)
    spec = dict(h.common, method="lora", config=h.config, lr=1e-3, cut=1)
    out = torch_worker(spec)
    assert out["plan_exhausted"] is True and out["steps"] == len(Data(data["data"]).plan)
    (point,) = out["curve"]  # the one evaluation (at the budget) never came: the last step's stands in
    assert point["final"] is True and point["step"] == out["steps"] and 0 <= point["metric"] <= 1


def test_checkpoint_watcher_starts_afresh_in_a_rerun_work_folder(tmp_path):
    """--reuse reruns a mobillm method in the same work folder: the snapshots of the earlier run
    must not stop the watcher (os.link onto an existing c000 once killed its thread silently)."""
    from mobillm.bench.paper.compare_harness import CheckpointWatcher

    run_dir, snaps = tmp_path / "run", tmp_path / "snaps"
    run_dir.mkdir()
    (snaps / "c000").mkdir(parents=True)
    (snaps / "c000" / "checkpoint.pt").write_bytes(b"old")
    (run_dir / "config.json").write_text("{}")
    watcher = CheckpointWatcher(run_dir, snaps)
    for version in (b"one", b"two"):
        (run_dir / "new.pt").write_bytes(version)
        (run_dir / "new.pt").replace(run_dir / "checkpoint.pt")  # a new inode each time, as the server writes
        watcher.poll()
    assert [Path(s["folder"]).name for s in watcher.snapshots] == ["c000", "c001"]
    assert (snaps / "c000" / "checkpoint.pt").read_bytes() == b"one"
