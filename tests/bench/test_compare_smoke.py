"""bench/paper/compare.py end to end at a tiny size: every method runs in its own process and reports
finite numbers (memory, compute, bytes, dev metric), the table and the plot are written."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch", exc_type=ModuleNotFoundError)
pytest.importorskip("transformers", exc_type=ModuleNotFoundError)
pytest.importorskip("peft", exc_type=ModuleNotFoundError)
pytest.importorskip("matplotlib", exc_type=ModuleNotFoundError)

REPO = Path(__file__).resolve().parents[2]
METHODS = ["full", "lora", "lora64", "bitfit", "split", "split-bitfit", "lst", "mobillm-local", "mobillm-pooled",
           "mobillm-tokens", "mobillm-cache", "mobillm-60mbps", "mobillm-int8"]


def finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


@pytest.mark.slow  # ~15 fresh processes, each importing torch (+ transformers): minutes on a busy 2-core box
def test_every_method_reports_finite_numbers(tiny_engine_factory, tmp_path):
    tiny = {"num_hidden_layers": 2}  # and hidden 64 (mobillm.common.sample.TINY_OPT)
    engine, engine_int8 = tiny_engine_factory(overrides=tiny), tiny_engine_factory(overrides=tiny, weights="int8")
    cmd = [sys.executable, "-m", "mobillm.bench.paper.compare", "--engine", str(engine), "--engine-int8", str(engine_int8),
           "--methods", ",".join(METHODS),
           "--train-rows", "64", "--dev-rows", "32", "--budget-minutes", "0.1", "--evals", "1",
           "--mobillm-epochs", "2", "--no-zero-eval", "--jobs", "2", "--work", str(tmp_path / "work"),
           "--json-out", str(tmp_path / "compare.json"), "--plot", str(tmp_path / "compare.png")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]

    summary = json.loads((tmp_path / "compare.json").read_text())
    rows = {r["method"]: r for r in summary["rows"]}
    assert list(rows) == METHODS
    for name, r in rows.items():
        assert r["error"] is None, (name, r["error"])
        assert finite(r["peak_rss_mb"]) and r["peak_rss_mb"] > 0, name
        assert finite(r["device_s_per_iter"]) and r["device_s_per_iter"] > 0, name
        assert finite(r["bytes_per_sample"]) and r["bytes_per_sample"] >= 0, name
        assert finite(r["metric_after_budget"]) and 0 <= r["metric_after_budget"] <= 1, name
        assert r["steps"] >= 1 and r["curve"], name
    on_the_link = [m for m in METHODS if m.startswith("mobillm-") and m != "mobillm-local"] + ["split", "split-bitfit"]
    for name in on_the_link:
        assert rows[name]["bytes_per_sample"] > 0, name
    assert rows["mobillm-pooled"]["bytes_per_sample"] < rows["mobillm-tokens"]["bytes_per_sample"]
    assert finite(summary["target"]) and summary["bytes"]["ratio"] >= 50
    assert {g["goal"] for g in summary["goals"]} >= {"device memory mobillm-pooled / LoRA",
                                                      "time to target mobillm-cache / LoRA"}
    for name in METHODS:
        assert f"| {name} |" in proc.stdout
    assert (tmp_path / "compare.png").stat().st_size > 10_000

    # The table of a finished run can be rebuilt from its work folder without running anything.
    again = cmd[:cmd.index("--json-out")] + ["--summarize-only", "--json-out", str(tmp_path / "again.json"),
                                              "--plot", str(tmp_path / "again.png")]
    proc2 = subprocess.run(again, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc2.returncode == 0, proc2.stderr[-4000:]
    rebuilt = json.loads((tmp_path / "again.json").read_text())
    assert rebuilt["rows"] == summary["rows"] and rebuilt["goals"] == summary["goals"]
    assert "started" not in proc2.stderr  # no method ran again
