"""Flags derived from config dataclasses (common/options.py) and the exit-status policy (common/errors.py)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import pytest

from mobillm.common.errors import BadInput, CheckFailed, run_command
from mobillm.common.options import HelpFormatter, add_options, all_but, from_args, option, read_token_file
from mobillm.common.procfs import peak_rss_mb, rss_mb


@dataclass(frozen=True)
class Opts:
    epochs: int = option(1, "passes over the data")
    bits: str = option("engine", "formats on the wire", choices=("engine", "auto"))
    blocks: list[int] | None = option(None, "layers per block", metavar="N,N")
    run: str | None = option(None, "run name")
    cache: bool = option(False, "cache taps")
    progress: bool = option(True, "progress bars")
    rate: float = option(0.5, "seconds", flag="latency-target")
    internal: int = option(7, "set by code", cli=False)


def parse(argv, **kw):
    p = argparse.ArgumentParser()
    add_options(p, Opts, **kw)
    return p, p.parse_args(argv)


def test_defaults_round_trip():
    _, args = parse([])
    assert from_args(Opts, args) == Opts()


def test_flags_types_and_switches():
    _, args = parse(["--epochs", "3", "--bits", "auto", "--blocks", "8,4,4", "--run", "r1", "--cache",
                     "--no-progress", "--latency-target", "0.25"])
    o = from_args(Opts, args, internal=9)
    assert o == Opts(epochs=3, bits="auto", blocks=[8, 4, 4], run="r1", cache=True, progress=False, rate=0.25,
                     internal=9)


def test_bad_values_are_usage_errors(capsys):
    for argv in (["--bits", "nope"], ["--epochs", "x"], ["--blocks", "8,a"], ["--internal", "3"]):
        with pytest.raises(SystemExit) as exc:
            parse(argv)
        assert exc.value.code == 2


def test_prefix_and_help(capsys):
    p, args = parse(["--fed-epochs", "2"], prefix="fed", skip=["bits"])
    assert args.fed_epochs == 2 and not hasattr(args, "fed_bits")
    assert from_args(Opts, args, prefix="fed", skip=["bits"]).epochs == 2
    assert "passes over the data" in p.format_help()


def test_exit_policy(capsys):
    def raise_(exc):
        raise exc

    assert run_command("x", lambda: raise_(BadInput("no such file"))) == 2
    assert "x: error: no such file" in capsys.readouterr().err
    assert run_command("x", lambda: raise_(CheckFailed("diff too large"))) == 1
    assert run_command("x", lambda: raise_(KeyboardInterrupt())) == 130
    assert run_command("x", lambda: None) == 0
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        run_command("x", lambda: 1 / 0)


def test_procfs_reads_this_process():
    assert peak_rss_mb() >= rss_mb() > 1


@dataclass(frozen=True)
class Needs:
    engine: str = option(help="engine folder")
    threads: int | None = option(None, "threads (default: all cores)")
    queue_size: int = option(8, "credits", flag="queue")


def test_required_field_metavar_and_help_defaults(tmp_path):
    p = argparse.ArgumentParser(formatter_class=HelpFormatter)
    add_options(p, Needs)
    with pytest.raises(SystemExit) as exc:
        p.parse_args([])
    assert exc.value.code == 2
    assert from_args(Needs, p.parse_args(["--engine", "e"])) == Needs(engine="e")
    text = " ".join(p.format_help().split())
    assert "--engine ENGINE engine folder --threads" in text  # a required flag shows no default
    assert "threads (default: all cores) --queue QUEUE credits (default: 8)" in text


def test_all_but_keeps_only_the_named_flags():
    p = argparse.ArgumentParser()
    add_options(p, Opts, skip=all_but(Opts, "epochs", "rate"))
    assert vars(p.parse_args([])) == {"epochs": 1, "rate": 0.5}


def test_read_token_file(tmp_path):
    (tmp_path / "t").write_text(" abc \n")
    assert read_token_file(tmp_path / "t") == "abc"
    (tmp_path / "e").write_text("\n")
    for path, message in ((tmp_path / "e", "is empty"), (tmp_path / "missing", "cannot read it"),
                          (tmp_path, "cannot read it")):
        with pytest.raises(BadInput, match=message):
            read_token_file(path)
