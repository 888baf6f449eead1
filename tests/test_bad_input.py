"""Bad input to any command is one line on stderr and exit status 2 (common/errors.py), never a
traceback: each case runs the command's real entry point on real files."""

import json
import shutil
import subprocess
import sys

import pytest
from helpers import write_rows

from mobillm.edge_runtime import cli as edge_cli
from mobillm.export import cli as export_cli


def edge_train(engine, data, server="ws://127.0.0.1:9"):
    return ["train", "--engine", str(engine), "--data", str(data), "--task", "sst2", "--server", server, "-q"]


def engine_with(tiny_engine, tmp_path, **tap0):
    """A copy of the tiny engine whose manifest's first tap has `tap0` changed (a hand-edited manifest)."""
    engine = tmp_path / "edited"
    shutil.copytree(tiny_engine, engine)
    manifest = json.loads((engine / "manifest.json").read_text())
    manifest["taps"][0].update(tap0)
    (engine / "manifest.json").write_text(json.dumps(manifest))
    return engine


def garbage(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(bytes(range(256)) * 8)
    return path


def trainer_main(argv):
    pytest.importorskip("torch", exc_type=ModuleNotFoundError)  # the server's optional dependency; our own
    from mobillm.trainer import cli as trainer_cli  # module is imported plainly: a broken import is an error

    return trainer_cli.main(argv)


# name -> (entry point, argv(tiny_engine, tmp_path), what the line must say)
CASES = {
    "server-http": (edge_cli.main, lambda e, t: edge_train(e, write_rows(t / "d.tsv", 4), "http://127.0.0.1:8765"),
                    "did you mean ws://127.0.0.1:8765"),
    "server-not-a-url": (edge_cli.main, lambda e, t: edge_train(e, write_rows(t / "d.tsv", 4), "not a url"),
                         "is not a WebSocket URL"),
    "device-id-newline": (edge_cli.main, lambda e, t: edge_train(e, "d.tsv") + ["--device-id", "evil\n"],
                          "--device-id 'evil\\n'"),
    "run-path": (edge_cli.main, lambda e, t: edge_train(e, "d.tsv") + ["--run", "../x"], "--run '../x'"),
    "manifest-hidden-lots": (edge_cli.main, lambda e, t: edge_train(engine_with(e, t, hidden="lots"),
                                                                    write_rows(t / "d.tsv", 4)),
                             "taps[0].hidden must be int, got 'lots'"),
    "manifest-block-size-negative": (edge_cli.main, lambda e, t: edge_train(engine_with(e, t, block_size=-1),
                                                                            write_rows(t / "d.tsv", 4)),
                                     "taps[0].block_size must be in 0..65535, got -1"),
    "data-garbage-tsv": (edge_cli.main, lambda e, t: edge_train(e, garbage(t, "rows.tsv")), "rows.tsv"),
    "data-garbage-csv": (edge_cli.main, lambda e, t: edge_train(e, garbage(t, "rows.csv")), "rows.csv"),
    "data-garbage-jsonl": (edge_cli.main, lambda e, t: edge_train(e, garbage(t, "rows.jsonl")), "rows.jsonl"),
    "export-out-under-a-file": (export_cli.main, lambda e, t: ["opt-125m", "--random-init", "--quiet", "--out",
                                                               str(t / "afile.x" / "engine")],
                                "is a file, not a folder"),
    "export-out-proc": (export_cli.main, lambda e, t: ["opt-125m", "--random-init", "--quiet", "--out",
                                                       "/proc/engine"], "/proc"),
    "serve-bad-certfile": (trainer_main, lambda e, t: ["serve", "--port", "0", "--runs", str(t / "runs"),
                                                       "--certfile", str(t / "bad.pem")],
                           "not a PEM certificate chain"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_and_exit_2(case, tiny_engine, tmp_path, capsys):
    main, argv, says = CASES[case]
    (tmp_path / "afile.x").write_text("a file, not a folder\n")
    (tmp_path / "bad.pem").write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    args = argv(tiny_engine, tmp_path)
    capsys.readouterr()
    status = main(args)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert status == 2 and "Traceback" not in err, err
    assert len(lines) == 1 and ": error: " in lines[0] and says in lines[0], err


# A bad flag or a missing argument: argparse's message on one line (common.options.Parser), no usage block.
USAGE_ERRORS = {
    "edge-run": (edge_cli.main, ["train", "--engine", "e", "--data", "d.tsv", "--epochs", "two"],
                 "edge-run train: error: argument --epochs: invalid int value: 'two'"),
    "edge-run-profile": (edge_cli.main, ["train", "--engine", "e", "--data", "d.tsv", "--profile"],
                         "edge-run train: error: argument --profile: expected one argument"),
    "trainer": (trainer_main, ["serve", "--queue", "many"], "trainer serve: error: argument --queue"),
    "export-backbone": (export_cli.main, ["opt-125m", "--out", "x", "--bogus"],
                        "export-backbone: error: unrecognized arguments: --bogus"),
}


@pytest.mark.parametrize("name", sorted(USAGE_ERRORS))
def test_a_bad_flag_is_one_line_and_exit_2(name, capsys):
    main, argv, says = USAGE_ERRORS[name]
    try:
        status = main(argv)
    except SystemExit as exc:  # edge-run and trainer exit from argparse; export-backbone returns the status
        status = exc.code
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and err.startswith(says) and "usage:" not in err, err


@pytest.mark.parametrize("argv, says", [
    (["mobillm.common.sample"], "the following arguments are required: out, rows"),
    (["mobillm.common.sample", "{tmp}/no/such/folder/x.tsv", "4"], "cannot write"),
    (["mobillm.export.fallback_tokenizer", "{tmp}/tok", "{tmp}/missing.txt"], "missing.txt: No such file"),
])
def test_module_entry_points_follow_the_policy(argv, says, tmp_path):
    args = [a.format(tmp=tmp_path) for a in argv]
    run = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=120)
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2 and len(lines) == 1 and says in lines[0], run.stderr
    assert lines[0].startswith(f"python -m {args[0]}: error: ")
