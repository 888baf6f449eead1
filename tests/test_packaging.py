"""The wheel is complete: built from the working tree, installed alone, it imports from itself.

The repository maps plain folders into the `mobillm` namespace through setuptools
`package-dir`, so a package missing from `pyproject.toml` (or a data file missing from
`package-data`) still imports fine from an editable install and only breaks in a wheel.
A real wheel build, offline, with the native libraries when cmake and a compiler are here
(about 30 s alone, far more on a busy machine): marked `slow` with the
other heavy tests; `.ci/run` runs every tier.
"""

import json
import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
MODULES = ["mobillm.edge_runtime.cli", "mobillm.kernels.codec", "mobillm.common.wire", "mobillm.common.manifest"]
CONFIG = "mobillm/export/configs/opt-1.3b.json"


def copy_sources(dest: Path) -> None:
    """Copy what the build reads (pyproject, README, the package folders) so the build leaves
    no build/ or egg-info behind in the working tree."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    dest.mkdir()
    for name in ["pyproject.toml", "README.md", "LICENSE", "setup.cfg", "setup.py", "MANIFEST.in", "CMakeLists.txt"]:
        if (REPO / name).exists():
            shutil.copy2(REPO / name, dest / name)
    folders = {p.split("/")[0] for p in pyproject["tool"]["setuptools"]["package-dir"].values()}
    for folder in sorted(folders):
        shutil.copytree(REPO / folder, dest / folder,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build", "*.so", "*.o"))


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, **kwargs)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.mark.slow
def test_wheel_installs_and_imports_from_itself(tmp_path):
    src, dist, target = tmp_path / "src", tmp_path / "dist", tmp_path / "site"
    copy_sources(src)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "--disable-pip-version-check", "-w", str(dist), str(src)])
    (wheel,) = dist.glob("mobillm-*.whl")

    names = zipfile.ZipFile(wheel).namelist()
    assert CONFIG in names, f"{CONFIG} is not in the wheel; check [tool.setuptools.package-data]"
    assert "mobillm/trainer/status.html" in names, "the status page is not in the wheel; check package-data"
    assert not [n for n in names if n.startswith(("tests/", "bench/", "docs/"))], "the wheel ships non-package files"
    assert not [n for n in names if n.startswith("mobillm/bench/")], "the benchmarks are for editable installs only"
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "edge-run = mobillm.edge_runtime.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()

    run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--disable-pip-version-check",
         "--target", str(target), str(wheel)])
    assert (target / CONFIG).is_file()
    native_built = shutil.which("cmake") and any(shutil.which(c) for c in ("c++", "g++", "clang++"))
    if native_built:  # the vendored ORT headers need nothing else: the op library is always in the wheel
        assert {"mobillm/kernels/lib/libmobillm_codec.so", "mobillm/kernels/lib/libmobillm_ort_ops.so"} <= set(names)

    # -S: no site module, so no .pth files and no editable-install finder pointing at the repo.
    # PYTHONPATH: the installed wheel first, then the dependencies' site-packages (numpy, onnxruntime...).
    deps = [p for p in site.getsitepackages() + [site.getusersitepackages()] if os.path.isdir(p)]
    env = {"PYTHONPATH": os.pathsep.join([str(target), *deps]), "PATH": os.environ.get("PATH", "")}
    code = ("import importlib, json, sys; "
            f"mods = {MODULES!r}; "
            "print(json.dumps({m: importlib.import_module(m).__file__ for m in mods}))")
    proc = run([sys.executable, "-S", "-s", "-c", code], cwd=tmp_path, env=env)
    files = json.loads(proc.stdout.strip().splitlines()[-1])
    for module, file in files.items():
        assert Path(file).resolve().is_relative_to(target.resolve()), f"{module} imported from {file}, not the wheel"
    if native_built:  # the device finds the installed op library and reads its op set version
        code = ("from mobillm.kernels import native; p = native.find_library('ort_ops'); "
                "print(p, native.op_library_version(p) == native.OP_VERSION)")
        path, ok = run([sys.executable, "-S", "-s", "-c", code], cwd=tmp_path, env=env).stdout.split()
        assert Path(path).resolve().is_relative_to(target.resolve()) and ok == "True"
