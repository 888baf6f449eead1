"""bench/micro/device_speed.py: the variant table as data, rows the exporter cannot build kept as skipped
with a reason, and (slow) a quick end-to-end run whose table and JSON hold every requested row."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mobillm.bench.micro import device_speed as ds

REPO = Path(__file__).resolve().parents[2]



def test_every_weight_quantizer_optimizer_combination_is_one_row():
    names = [v.name for v in ds.VARIANTS]
    assert len(names) == len(set(names))
    for w in ds.WEIGHTS:
        for q in ds.QUANTIZERS:
            for o in ("", "-opt", "-noopt"):
                v = next(v for v in ds.VARIANTS if v.name == f"{w}-{q}{o}")
                assert v.flags[:2] == ("--weights", w) and "--quant-op" in v.flags
    assert sum(v.torch for v in ds.VARIANTS) == 1


def test_tap_cost_pairs_differ_only_in_the_tap_format():
    pairs = {(n.name, f.name) for n, f in ds.tap_pairs(ds.VARIANTS)}
    assert pairs == {("default", "default-fp16taps"), ("int4", "int4-fp16taps")}


def test_a_flag_the_exporter_lacks_is_named():
    known = {"--weights", "--quant-op", "--quant"}
    assert ds.unknown_flags(("--weights", "int4", "--optimize"), known) == ["--optimize"]
    assert ds.unknown_flags(("--weights", "int4", "--quant", "fp16"), known) == []


def test_a_row_asked_for_and_not_measured_exits_1(tmp_path, monkeypatch, capsys):
    """An exporter that cannot build the row (here: one without --weights): the table keeps the row
    with its reason, and the script exits 1 (it once printed "skipped" and exited 0)."""
    monkeypatch.setattr(ds, "exporter_flags", lambda: {"--out", "--quant"})
    assert ds.main(["--quick", "--variants", "int4", "--engines", str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    assert "| opt-125m | int4 | - | - | - | export-backbone has no --weights" in out
    assert "device_speed: not measured: opt-125m int4: export-backbone has no --weights" in err


def test_exporter_flags_are_read_from_its_help():
    assert {"--weights", "--quant-op", "--quant", "--out"} <= ds.exporter_flags()


def test_engine_folders_differ_per_flag_set_and_quick_mode(tmp_path):
    dirs = {ds.engine_dir(tmp_path, "opt-125m", v) for v in ds.VARIANTS if not v.torch}
    # rows that differ only in session options (int4-prepack, gguf-prepack) reuse their engine
    assert len(dirs) == len({v.flags for v in ds.VARIANTS if not v.torch})
    assert len(dirs) == len(ds.VARIANTS) - 1 - sum(1 for v in ds.VARIANTS if v.session)
    default = ds.Variant("default")
    assert ds.engine_dir(tmp_path, "opt-125m", default) != ds.engine_dir(tmp_path, "opt-125m", default, quick=True)


@pytest.mark.parametrize("argv, message", [
    (["--variants", "nosuchrow"], "matches no row"),
    (["--models", "opt-1.3b"], "--heavy"),
    (["--models", "gpt-9"], "unknown"),
    (["--quick", "--models", "gemma-3-270m"], "real weights"),
    (["--rounds", "0"], ">= 1"),
])
def test_bad_arguments_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        ds.parse_args(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.slow  # four tiny exports and five measured processes, each importing torch or ORT: ~40 s here
def test_quick_run_reports_every_requested_row(tmp_path):
    pytest.importorskip("torch", exc_type=ModuleNotFoundError)
    pytest.importorskip("transformers", exc_type=ModuleNotFoundError)
    rows = ["torch-eager", "default", "default-fp16taps", "int4", "int4-fp16taps", "fp32-std-noopt"]
    out = tmp_path / "speed.json"
    proc = subprocess.run([sys.executable, "-m", "mobillm.bench.micro.device_speed", "--quick", "--engines",
                           str(tmp_path / "engines"), "--variants", ",".join(rows), "--json-out", str(out)],
                          capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [r["variant"] for r in result["rows"]] == rows
    table = proc.stdout.splitlines()
    for row in rows:
        assert any(line.startswith(f"| opt-125m | {row} |") for line in table), row
    for r in result["rows"]:  # exit 0: every row asked for was measured
        assert r["status"] == "ok" and r["tokens_per_s"] > 0 and r["peak_rss_mib"] > 0 and r["ratio"] > 0, r
    assert {(c["nf4"], c["fp16"]) for c in result["tap_cost"]} == {("default", "default-fp16taps"),
                                                                    ("int4", "int4-fp16taps")}
    load = result["load_average_1min"]
    assert 0 <= load["min"] <= load["mean"] <= load["max"]
