"""bench/paper/parity.py and compare.py's fair protocol (issue 26, item 4): held-out train rows, early
stopping on them, --cache epochs sized to the budget, and the paired bootstrap over seeds."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mobillm.bench.paper.compare_config import Settings
from mobillm.bench.paper.compare_curves import holdout_choice
from mobillm.bench.paper.compare_methods import cached_step_s, on_grid, size_cache_epochs
from mobillm.bench.paper.parity import paired_bootstrap

REPO = Path(__file__).resolve().parents[2]


def test_holdout_choice_is_the_holdout_argmax_and_t0_only_when_strictly_best():
    curve = [{"t": 0.0, "metric": 0.5, "holdout": 0.7}, {"t": 10.0, "metric": 0.9, "holdout": 0.6},
             {"t": 20.0, "metric": 0.6, "holdout": 0.7}, {"t": 30.0, "metric": 0.8, "holdout": 0.65},
             {"t": 99.0, "metric": 0.99, "holdout": 0.99}]  # past the budget: not a candidate
    chosen = holdout_choice(curve, budget=30.0)
    assert chosen["t"] == 20.0 and chosen["metric"] == 0.6  # the tie with t = 0 goes to the trained point
    curve[0]["holdout"] = 0.71
    assert holdout_choice(curve, budget=30.0)["t"] == 0.0  # really best: chosen
    assert holdout_choice([{"t": 1.0, "metric": 0.5}], 30.0) is None  # no holdout scores: no choice


def test_paired_bootstrap_brackets_the_mean_difference_and_narrows_with_pairing():
    rng = np.random.default_rng(1)
    b = (rng.random(872) < 0.88).astype(float)
    a = b.copy()
    flip = rng.choice(872, 20, replace=False)
    a[flip] = 1 - a[flip]
    mean, lo, hi = paired_bootstrap(a, b, 4000, seed=0)
    assert mean == pytest.approx(a.mean() - b.mean())
    assert lo < mean < hi and hi - lo < 0.03  # pairing: only the 20 flipped examples vary
    same = paired_bootstrap(b, b, 1000)
    assert same == (0.0, 0.0, 0.0)


def test_cache_epochs_fill_the_budget_from_forward_and_cached_step_rates(tmp_path):
    s = Settings(budget_minutes=3, batch_size=16, cache_fill=0.9, forward_s_per_row=0.03, cache_select=[])
    epochs, rule = size_cache_epochs(s, 4000, cached_s=0.02)  # first epoch 120 s, cached epoch 5 s
    assert epochs == 1 + int((0.9 * 180 - 120) // 5) == 9 and "cached epoch" in rule
    assert size_cache_epochs(s, 4000, cached_s=None)[0] == 2  # nothing measured: the old 2 epochs
    assert size_cache_epochs(Settings(forward_s_per_row=1.0, cache_select=[]), 4000, 0.02)[0] == 2  # past the budget
    chosen = size_cache_epochs(Settings(forward_s_per_row=0.03), 4000, 0.02)  # the default: the server chooses
    assert chosen[0] == 2 and "chooses the cached epochs among 1,2,3,4,6,8" in chosen[1]
    lines = [{"step": k + 1, "samples": 16 * (k + 1), "rows": 16, "time": 100.0 + (k if k < 4 else 4 + (k - 4) * 0.1)}
             for k in range(8)]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert cached_step_s(tmp_path / "m.jsonl", rows_per_epoch=64) == pytest.approx(0.1)  # steps 5..8, not 1..4
    snaps = [{"mtime": 1000.0 + t} for t in (5, 10, 15, 20, 25, 30, 35, 40, 45, 50, 55, 65)]
    assert on_grid(snaps, 1000.0, budget=60.0, evals=2) == [5, 10]  # latest at or before 30 s and 60 s


def test_holdout_rows_are_train_rows_disjoint_from_the_training_subset(tiny_engine, tmp_path):
    from mobillm.bench.paper.compare_data import prepare_data

    data = prepare_data(Settings(train_rows=40, holdout_rows=24, dev_rows=16, seed=3, data_seed=0), tiny_engine,
                        (tmp_path / "a").mkdir() or tmp_path / "a")
    again = prepare_data(Settings(train_rows=40, holdout_rows=0, dev_rows=16, seed=5, data_seed=0), tiny_engine,
                         (tmp_path / "b").mkdir() or tmp_path / "b")
    train = Path(data["train_file"]).read_text().splitlines()[1:]
    held = Path(data["holdout_file"]).read_text().splitlines()[1:]
    assert data["holdout_rows"] == len(held) == 24 and data["train_rows"] == 40
    assert not set(held) & set(train)
    assert Path(again["train_file"]).read_text() == Path(data["train_file"]).read_text()  # same rows, other seed
    assert again["holdout_file"] is None
    dev = set(Path(data["dev_file"]).read_text().splitlines()[1:])
    src = REPO.parent / "shared" / "data" / "glue" / "SST-2" / "train.tsv"
    if src.is_file():  # real GLUE: holdout rows come from train.tsv, never dev
        assert set(held) <= set(src.read_text().splitlines()) and not set(held) & dev


@pytest.mark.slow  # three compare.py runs, each importing torch: a few minutes on a busy 2-core box
def test_parity_driver_end_to_end_on_a_tiny_model(tiny_engine_factory, tmp_path):
    engine = tiny_engine_factory(overrides={"num_hidden_layers": 2})
    out = tmp_path / "parity"
    cmd = [sys.executable, "-m", "mobillm.bench.paper.parity", "--seeds", "0,1", "--methods", "lora,mobillm-cache",
           "--once", "mobillm-local", "--bootstrap", "500", "--out", str(out), "--",
           "--engine", str(engine), "--train-rows", "96", "--holdout-rows", "32", "--dev-rows", "32",
           "--budget-minutes", "0.1", "--evals", "2", "--threads", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1500, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    agg = json.loads((out / "parity.json").read_text())
    assert set(agg["methods"]) == {"lora", "mobillm-cache", "mobillm-local"}
    for tag in ("seed-0", "seed-1"):
        summary = json.loads((out / f"{tag}.json").read_text())
        for row in summary["rows"]:
            choice = row["holdout_choice"]
            scored = [p for p in row["curve"] if p.get("holdout") is not None and p["t"] <= summary["budget_s"]
                      or p.get("final")]
            assert choice["holdout"] == max(p["holdout"] for p in scored if p.get("holdout") is not None)
            assert len(row["dev_correct_at_holdout_best"]) == summary["dev_rows"]
            assert np.mean(row["dev_correct_at_holdout_best"]) == pytest.approx(row["metric_at_holdout_best"])
        cache = next(r for r in summary["rows"] if r["method"] == "mobillm-cache")
        assert 2 <= cache["epochs"] <= 9 and "chooses the cached epochs" in cache["epochs_rule"]
        assert "2 processes" in cache["threads"]
    d = agg["differences"]["mobillm-cache"]
    m = agg["methods"]
    assert d["lo"] <= d["mean"] <= d["hi"]
    assert d["mean"] == pytest.approx(m["mobillm-cache"]["chosen_mean"] - m["lora"]["chosen_mean"])
    assert len(m["lora"]["chosen"]) == 2 and m["lora"]["chosen_sd"] is not None
    assert "| lora | 2 |" in (out / "parity.md").read_text()


def fake_row(method, correct, holdout_t=60.0, curve=((60.0, 0.8), (120.0, 0.9))):
    acc = float(np.mean(correct))
    return {"method": method, "error": None, "metric_at_holdout_best": acc, "metric_after_budget": acc - 0.01,
            "holdout_choice": {"t": holdout_t, "holdout": 0.9, "metric": acc}, "dev_correct_at_holdout_best": correct,
            "best_dev_in_budget": max(m for _, m in curve), "dev_curve": [list(p) for p in curve],
            "threads": "1 thread(s), 1 process", "lr": 1e-3, "schedule_cut": False, "epochs": None,
            "samples_per_s": 10.0, "samples_trained": 100}


def test_aggregate_reports_seed_means_the_paired_difference_and_time_ratio_and_rebuilds_from_files(tmp_path):
    from mobillm.bench.paper.parity import aggregate, main

    rng = np.random.default_rng(0)
    truth = (rng.random(200) < 0.85).astype(int)
    runs = []
    for seed in range(3):
        lora = truth.copy()
        cache = truth.copy()
        cache[rng.choice(200, 6, replace=False)] ^= 1
        rows = [fake_row("lora", lora.tolist(), curve=((60.0, 0.86), (120.0, 0.9))),
                fake_row("mobillm-cache", cache.tolist(), curve=((30.0, 0.5), (90.0, 0.88)))]
        summary = {"rows": rows}
        (tmp_path / f"seed-{seed}.json").write_text(json.dumps(summary))
        runs.append({"tag": f"seed-{seed}", "seed": seed, "methods": ["lora", "mobillm-cache"], "rc": 0,
                     "minutes": 1.0, "loadavg": [[1.0] * 3] * 2, "command": "x", "summary": summary})
    agg = aggregate(runs, bootstrap=2000)
    m, d = agg["methods"], agg["differences"]["mobillm-cache"]
    assert m["lora"]["chosen_mean"] == pytest.approx(truth.mean()) and m["lora"]["chosen_sd"] == 0.0
    assert d["mean"] == pytest.approx(m["mobillm-cache"]["chosen_mean"] - m["lora"]["chosen_mean"])
    assert d["lo"] <= d["mean"] <= d["hi"] < 0.0  # (seeded: most of the flips turn a correct answer wrong)
    # target 0.95 x 0.9 = 0.855: LoRA at 60 s, mobillm-cache at 90 s -> 1.5
    assert agg["timing"]["ratio"] == pytest.approx(1.5)
    # each time is bracketed by the last evaluation below the target: LoRA (0, 60], mobillm-cache (30, 90],
    # so the true ratio lies in [30 / 60, 90 / 0) = [0.5, unbounded)
    assert agg["timing"]["reference_last_below_s"] == [0.0] * 3 and agg["timing"]["versus_last_below_s"] == [30.0] * 3
    assert agg["timing"]["ratio_bounds"] == [pytest.approx(0.5), None]
    assert [g["met"] for g in agg["goals"]][2] is False
    # --aggregate-only reads the runs in OUT and gives the same statistics
    assert main(["--seeds", "0,1,2", "--once", "", "--bootstrap", "2000", "--out", str(tmp_path), "--aggregate-only"]) == 0
    again = json.loads((tmp_path / "parity.json").read_text())
    assert again["differences"]["mobillm-cache"] == pytest.approx(d)
    assert "| mobillm-cache | 3 |" in (tmp_path / "parity.md").read_text()
