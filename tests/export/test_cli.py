"""`export-backbone` in-process: exit codes, one-line errors, nothing left behind on failure."""

import json

import pytest

pytest.importorskip("torch", exc_type=ModuleNotFoundError)
pytest.importorskip("transformers", exc_type=ModuleNotFoundError)

from mobillm.export.cli import main  # noqa: E402

TINY = ["--random-init", "--set", "hidden_size=64", "--set", "num_hidden_layers=4", "--set", "ffn_dim=128",
        "--set", "num_attention_heads=4", "--set", "word_embed_proj_dim=64", "--set", "max_position_embeddings=256"]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("args, message", [
    (["opt-999m"], "unknown model 'opt-999m'"),
    (["facebook/opt-125m\n"], "unknown model 'facebook/opt-125m\\n'"),  # an id is checked whole
    (["facebook/ｏpt-125m"], "unknown model"),  # a lookalike letter is no Hugging Face id
    (["opt-125m", *TINY, "--taps", "2,9"], "--taps 9 outside 1..4"),
    (["opt-125m", *TINY, "--blocks", "1,1"], "--blocks 1,1 sums to 2 but the model has 4 layers"),
    (["opt-125m", *TINY, "--set", "hidden_sizes=3"], "--set hidden_sizes: no such config field"),
    (["opt-125m", *TINY, "--set", "num_hidden_layers=four"], "expected a int"),
    (["opt-125m", *TINY, "--set", "num_hidden_layers"], "expected key=value"),
    (["opt-125m", *TINY, "--quant", "int3"], "unknown quant format 'int3'"),
    (["opt-125m", *TINY, "--quant", "nf4,int8"], "--quant lists 2 formats but there are 4 taps"),
    (["opt-125m", *TINY, "--blocks", "2,2", "--taps", "4"], "not allowed with"),
    (["opt-125m", *TINY, "--dtype", "fp16", "--weights", "int8"], "--dtype fp16 needs fp16 weights"),
    (["opt-125m", *TINY, "--dtype", "bf16"], "invalid choice: 'bf16'"),
    (["opt-125m", *TINY, "--blocks", "4,x"], "not a comma-separated list of integers"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, tokenizer_dir, args, message):
    status = main([*args, "--out", str(tmp_path / "engine"), "--tokenizer", str(tokenizer_dir)])
    assert status == 2
    line = one_line_error(capsys)
    assert line.startswith("export-backbone")
    assert message in line
    assert leftovers(tmp_path) == []


def test_existing_out_needs_force(tmp_path, capsys):
    (tmp_path / "engine").mkdir()
    assert main(["opt-125m", *TINY, "--out", str(tmp_path / "engine")]) == 2
    assert "already exists; pass --force" in one_line_error(capsys)


def test_checkpoint_folder_without_config(tmp_path, capsys):
    (tmp_path / "ckpt").mkdir()
    assert main([str(tmp_path / "ckpt"), "--out", str(tmp_path / "engine")]) == 2
    assert "checkpoint folder has no config.json" in one_line_error(capsys)
    assert leftovers(tmp_path) == ["ckpt"]


def test_missing_tokenizer_folder(tmp_path, capsys):
    assert main(["opt-125m", *TINY, "--out", str(tmp_path / "engine"), "--tokenizer", str(tmp_path / "nope")]) == 2
    assert "not a folder with tokenizer files" in one_line_error(capsys)


def test_failed_export_leaves_nothing_and_keeps_the_old_engine(tmp_path, capsys, tokenizer_dir, tiny_engine):
    import shutil

    # 64 is not divisible by 5 heads: the model build fails after the temp folder exists.
    bad = ["opt-125m", *TINY, "--set", "num_attention_heads=5", "--tokenizer", str(tokenizer_dir), "--quiet"]
    assert main([*bad, "--out", str(tmp_path / "engine")]) == 2
    assert "cannot build" in one_line_error(capsys)
    assert leftovers(tmp_path) == []

    old = tmp_path / "old"
    shutil.copytree(tiny_engine, old)
    before = (old / "manifest.json").read_text()
    assert main([*bad, "--out", str(old), "--force"]) == 2
    assert (old / "manifest.json").read_text() == before
    assert leftovers(tmp_path) == ["old"]


def test_export_then_verify_dir(tmp_path, capsys, tokenizer_dir):
    out = tmp_path / "engine"
    status = main(["opt-350m", *TINY, "--set", "do_layer_norm_before=false", "--set", "word_embed_proj_dim=32",
                   "--taps", "2", "--quant", "int4,fp8", "--out", str(out), "--tokenizer", str(tokenizer_dir),
                   "--verify", "--seed", "3"])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert "verify: all taps within bounds" in captured.err
    assert "bytes per sample per token" in captured.out
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["seed"] == 3 and [t["hidden"] for t in manifest["taps"]] == [64, 32]

    assert main(["verify", str(out)]) == 0
    table = capsys.readouterr().out
    assert "tap  layer  width" in table and "FAIL" not in table

    (out / "backbone.onnx").write_bytes((out / "backbone.onnx").read_bytes() + b"\0")
    assert main(["verify", str(out)]) == 2
    assert "checksum mismatch for backbone.onnx" in one_line_error(capsys)


def test_verify_of_a_folder_that_is_not_an_engine(tmp_path, capsys):
    assert main(["verify", str(tmp_path)]) == 2
    assert "no manifest.json" in one_line_error(capsys)


def test_help(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for option in ("--out", "--random-init", "--set", "--tokenizer", "--blocks", "--taps", "--quant",
                   "--block-size", "--dtype", "--weights", "--force", "--verify", "--seed"):
        assert option in out


def test_verify_of_an_engine_that_does_not_match_its_model_exits_1(tiny_engine, tmp_path, capsys):
    import shutil

    engine = tmp_path / "engine"
    shutil.copytree(tiny_engine, engine)
    data = json.loads((engine / "manifest.json").read_text())
    data["seed"] = 1  # the torch reference now has other weights than the graph
    (engine / "manifest.json").write_text(json.dumps(data))
    assert main(["verify", str(engine)]) == 1
    assert "verify: FAILED" in capsys.readouterr().out


@pytest.mark.slow  # fast-tier budget: a real export interrupted
def test_interrupt_exits_130_and_leaves_nothing(tmp_path, tokenizer_dir):
    import signal
    import subprocess
    import sys

    out = tmp_path / "engine"
    # Ctrl-C as a terminal delivers it (a background job may have inherited SIGINT ignored).
    code = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
            "from mobillm.export.cli import main; sys.exit(main())")
    proc = subprocess.Popen([sys.executable, "-c", code, "opt-125m", *TINY, "--tokenizer", str(tokenizer_dir),
                             "--out", str(out)], stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if "building opt model" in line:  # the temp folder exists: the interrupt must remove it
            proc.send_signal(signal.SIGINT)
            break
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 130, err
    assert f"export-backbone: error: interrupted; nothing was written to {out}" in err
    assert leftovers(tmp_path) == []


def test_help_explains_every_flag_with_its_default(help_entries):
    import sys

    entries = help_entries(lambda argv: sys.exit(main(argv)), [])
    assert set(entries) >= {"--out", "--set", "--blocks", "--taps", "--quant", "--block-size", "--dtype", "--weights",
                            "--exporter", "--quant-op", "--tap-norm", "--trt", "--verify", "--quiet", "--seed"}
    for flag, entry in entries.items():
        assert len(entry) > len(flag) + 20, entry  # a sentence, not just the flag
    assert entries["--quant"].endswith("(default: nf4)") and entries["--block-size"].endswith("(default: 64)")
    assert entries["--weights"].endswith("(default: same as --dtype)")
