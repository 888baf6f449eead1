"""The linters CI runs (.ci/lint): ruff on the whole tree, mypy on the packages pyproject names.

mypy cannot see `mobillm.*` through the editable install's import hook, so .ci/lint links the
package-dir folders under build/typecheck; these tests keep that link list and pyproject in step."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
LINT = ROOT / ".ci" / "lint"


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _linked_folders() -> list[str]:
    loop = re.search(r"for folder in ([\w ]+); do", LINT.read_text())
    assert loop, ".ci/lint no longer links the package folders for mypy"
    return loop.group(1).split()


def test_lint_script_links_the_package_dir_folders_mypy_checks():
    package_dir = _pyproject()["tool"]["setuptools"]["package-dir"]
    mypy = _pyproject()["tool"]["mypy"]
    assert mypy["mypy_path"].endswith("build/typecheck")
    linked = _linked_folders()
    for folder in linked:  # each link mirrors pyproject's mapping of mobillm.<folder>
        assert package_dir[f"mobillm.{folder}"] == folder
    for package in mypy["packages"]:
        assert package.split(".")[1] in linked, f"{package} is checked but not linked into build/typecheck"
    assert {"mobillm.common", "mobillm.edge_runtime"} <= set(mypy["packages"])
    assert "ruff check ." in LINT.read_text().splitlines()


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff not installed (pip install -e '.[dev]')")
def test_ruff_clean():
    run = subprocess.run(["ruff", "check", "."], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("mypy") is None or shutil.which("ruff") is None,
                    reason="ruff/mypy not installed (pip install -e '.[dev]')")
def test_lint_script_passes():
    run = subprocess.run(["bash", str(LINT)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Success: no issues found" in run.stdout
