"""Shared fixtures: tiny exported engines (random OPT, real tokenizer when ../shared has it)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from skip_gate import pytest_make_collect_report, pytest_runtest_makereport, strict  # noqa: F401 (hooks)

from mobillm.common.sample import TINY_OPT
from mobillm.export.fallback_tokenizer import build_fallback_tokenizer

# The shared data folder is a sibling of the repository root; tests skip or fall back without it.
SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
SHARED_TOKENIZER = SHARED_DATA / "tokenizer" / "opt"

@pytest.fixture(scope="session")
def fallback_tokenizer_dir(tmp_path_factory) -> Path:
    """A tiny OPT-style tokenizer built with `tokenizers`, for machines without ../shared."""
    return build_fallback_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def tokenizer_dir(request) -> Path:
    """The real OPT tokenizer from ../shared when present, else the tiny stand-in."""
    if (SHARED_TOKENIZER / "vocab.json").is_file():
        return SHARED_TOKENIZER.resolve()
    if strict():  # CI tests the real tokenizer; the stand-in would hide a missing ../shared/data
        pytest.fail(f"the real OPT tokenizer ({SHARED_TOKENIZER}) is absent: CI needs ../shared/data "
                    "(MOBILLM_STRICT_SKIPS=1)", pytrace=False)
    return request.getfixturevalue("fallback_tokenizer_dir")


@pytest.fixture(scope="session")
def tiny_engine_factory(tmp_path_factory, tokenizer_dir):
    """make(quant="nf4", overrides=None, **export_engine_kwargs) -> engine Path (cached per arguments).

    `overrides` are merged over TINY_OPT; other keywords go to `export_engine` (blocks, taps,
    block_size, dtype, weights, seed, verify, model).
    """
    pytest.importorskip("torch", exc_type=ModuleNotFoundError)
    pytest.importorskip("transformers", exc_type=ModuleNotFoundError)
    from mobillm.export.pipeline import export_engine

    cache: dict[str, Path] = {}

    def make(quant="nf4", overrides: dict | None = None, **kwargs) -> Path:
        key = json.dumps([quant, overrides, kwargs], sort_keys=True, default=str)
        if key not in cache:
            out = tmp_path_factory.mktemp("engine") / "engine"
            model = kwargs.pop("model", "opt-125m")
            export_engine(model, out, random_init=True, overrides={**TINY_OPT, **(overrides or {})},
                          tokenizer=tokenizer_dir, quant=quant, progress=False, **kwargs)
            cache[key] = out
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_engine(tiny_engine_factory) -> Path:
    """A 4-layer random OPT exported with nf4 taps (layers 1,2,3,4) and the OPT tokenizer."""
    return tiny_engine_factory()


@pytest.fixture
def help_entries(monkeypatch, capsys):
    """help_entries(main, [subcommand]) -> {flag: its --help entry on one line}, from the real `--help`."""
    import re

    monkeypatch.setenv("COLUMNS", "1000")  # argparse wraps to the terminal width; one line per entry is easier to read

    def entries(main, argv: list[str]) -> dict[str, str]:
        with pytest.raises(SystemExit) as exc:
            main([*argv, "--help"])
        assert exc.value.code == 0
        out, flag = {}, None
        for line in capsys.readouterr().out.splitlines():
            start = re.match(r" {2}(-[-\w]+)", line)
            if start:
                flag = start.group(1)
                out[flag] = line.strip()
            elif flag and line.startswith("    "):
                out[flag] += " " + line.strip()
            else:
                flag = None
        return out

    return entries
