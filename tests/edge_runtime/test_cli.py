"""`edge-run`'s flags (derived from EngineOptions, DataOptions, TrainOptions) and its exit statuses:
2 with one line on stderr for anything the user can fix, never a traceback."""

import dataclasses
import subprocess
import sys

import pytest

from mobillm.common.options import from_args, option_fields
from mobillm.common.tasks import get_task
from mobillm.edge_runtime import cli
from mobillm.edge_runtime.backbone import EngineOptions
from mobillm.edge_runtime.data import DataError, DataOptions
from mobillm.edge_runtime.stream import TrainOptions


def parse(argv):
    return cli.build_parser().parse_args(argv)


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("edge-run: error: "), err
    return err[0]


def test_train_defaults_are_train_options_defaults():
    args = parse(["train", "--engine", "e", "--data", "d.tsv"])
    assert from_args(TrainOptions, args) == TrainOptions()
    assert from_args(DataOptions, args) == DataOptions()
    assert from_args(EngineOptions, args) == EngineOptions(engine=args.engine)


def test_train_flags_map_onto_train_options():
    args = parse(["train", "--engine", "e", "--data", "d.tsv", "--server", "wss://h:1", "--epochs", "3",
                  "--batch-size", "8", "--max-len", "64", "--send", "tokens", "--bits", "auto",
                  "--latency-target", "0.2", "--seed", "5", "--device-id", "phone", "--run", "r1",
                  "--ca", "ca.pem", "--side-out", "s.onnx"])
    assert from_args(TrainOptions, args, token="t", progress=False) == TrainOptions(
        server="wss://h:1", epochs=3, batch_size=8, max_len=64, mode="tokens", bits="auto", latency_target_s=0.2,
        seed=5, device_id="phone", run="r1", token="t", ca="ca.pem", side_out="s.onnx", progress=False)


def test_predict_batches_with_training_defaults():
    args = parse(["predict", "--engine", "e", "--side", "s.onnx", "--max-len", "32", "hi"])
    batching = from_args(TrainOptions, args)
    assert (batching.max_len, batching.batch_size) == (32, TrainOptions().batch_size)
    assert not hasattr(args, "server") and args.texts == ["hi"]


@pytest.mark.parametrize("argv", [
    ["train", "--data", "d.tsv"],  # no --engine
    ["train", "--engine", "e"],  # no --data
    ["train", "--engine", "e", "--data", "d.tsv", "--send", "rows"],
    ["train", "--engine", "e", "--data", "d.tsv", "--epochs", "two"],
    ["train", "--engine", "e", "--data", "d.tsv", "--provider", "npu"],
    ["predict", "--engine", "e", "hi"],  # no --side
    ["eval", "--engine", "e", "--side", "s.onnx"],  # no --data
])
def test_bad_flags_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("edge-run") and ": error: " in err and err.count("\n") == 1, err


@pytest.mark.parametrize("command", ["train", "predict", "eval"])
def test_help_shows_every_default(command, help_entries):
    entries = help_entries(cli.main, [command])
    required = {"--engine", "--side"} | ({"--data"} if command != "predict" else set())
    for flag, text in entries.items():
        if flag not in required | {"-h"}:
            assert "(default" in text, f"{command} {flag}: {text}"
    # Each TrainOptions default is shown as the dataclass declares it: edge-run restates none.
    for f, _meta, _tp in option_fields(TrainOptions):
        flag = "--" + (_meta["flag"] or f.name.replace("_", "-"))
        if flag in entries and f.default is not None:
            assert f"(default: {f.default})" in entries[flag]
    assert (command == "train") == ("--server" in entries)


def test_missing_engine_is_one_line_in_a_real_process(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mobillm.edge_runtime.cli", "train", "--engine",
                           str(tmp_path / "missing"), "--data", str(tmp_path / "d.tsv")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"edge-run: error: {tmp_path / 'missing'}: engine folder not found; run export-backbone first and copy "
        f"its --out here"]


def _train(engine, data, *extra):
    return cli.main(["train", "--engine", str(engine), "--data", str(data), "-q", *extra])


def test_user_errors_exit_2_with_one_line(tiny_engine, tmp_path, capsys):
    good = tmp_path / "d.tsv"
    good.write_text("sentence\tlabel\nfine\t1\n")
    binary = tmp_path / "b.tsv"
    binary.write_bytes(b"sentence\tlabel\n\xff\xfe\x00bad\t1\n")
    empty_token = tmp_path / "token"
    empty_token.write_text("\n")
    cases = [
        ((tmp_path / "nope.tsv",), "nope.tsv: no such file or folder"),
        ((binary,), "not UTF-8 text"),
        ((tmp_path,), "datasets"),  # a folder that is not a saved dataset: needs `datasets`, or fails to load
        ((good, "--task", "sst3"), "unknown task 'sst3'"),
        ((good, "--bits", "nf5"), "unknown quant format 'nf5'"),
        ((good, "--bits", "nf4,int8"), "2 formats for an engine with 4 taps"),
        ((good, "--token-file", str(tmp_path / "no-token")), "cannot read it"),
        ((good, "--token-file", str(empty_token)), "is empty"),
    ]
    for (data, *extra), message in cases:
        assert _train(tiny_engine, data, *extra) == 2, message
        assert message in one_error_line(capsys)


def test_predict_without_side_network_or_input(tiny_engine, tmp_path, capsys):
    assert cli.main(["predict", "--engine", str(tiny_engine), "--side", str(tmp_path / "s.onnx"), "hi"]) == 2
    assert "side network not found" in one_error_line(capsys)


def test_data_options_resolve_task():
    assert DataOptions().resolve_task() == get_task("sst2")
    custom = DataOptions(text_cols="q,a", label_col="y", num_labels=3).resolve_task()
    assert (custom.name, custom.text_cols, custom.label_col, custom.num_labels) == ("custom", ("q", "a"), "y", 3)
    regression = DataOptions(text_cols="t", label_col="s", num_labels=1, regression=True).resolve_task()
    assert regression.kind == "regression" and regression.metric == "pearson"
    renamed = DataOptions(task="sst2", label_col="sentiment").resolve_task()
    assert renamed == dataclasses.replace(get_task("sst2"), label_col="sentiment")
    with pytest.raises(DataError, match="unknown task"):
        DataOptions(task="nope").resolve_task()


def test_fixed_formats():
    from mobillm.edge_runtime.batches import fixed_formats

    for ok in ("engine", "auto", "nf4", "none", "nf4,int8,fp8,fp16"):
        fixed_formats(ok, 4)
    assert fixed_formats("nf4", 4) == ["nf4"] * 4 and fixed_formats("auto", 4) is None
    for bad in ("nf5", "nf4,int8", "nf4,,int8,fp8"):
        with pytest.raises(cli.BadInput):
            fixed_formats(bad, 4)
