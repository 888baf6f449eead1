"""Build hook: a regular `pip install .` also builds the native kernels when it can.

The package itself is described in pyproject.toml. This hook runs CMake after build_py and
copies the libraries (lib*.so: the C++ kernel and the ONNX Runtime custom ops; docs/native.md)
into mobillm/kernels/lib, where mobillm.kernels.native finds them. It does nothing, with a
message, for editable installs (`pip install -e .`: the tests build into build/native
instead), with MOBILLM_NATIVE=0, or without the sources, cmake or a compiler; a failed native
build never fails the install. MOBILLM_NATIVE_CUDA=1 adds the CUDA libraries.

An editable install (`pip install -e .`) also maps bench/ into the namespace as `mobillm.bench`
(`python -m mobillm.bench.paper.compare ...`): the benchmarks read the checkout around them
(../shared/data, docs/runs, engines/), so a wheel does not ship them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from setuptools import Distribution, setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

ROOT = Path(__file__).resolve().parent
# bench/ and its folders by purpose (tests/test_import_graph.py lists them too): editable installs only.
BENCH = ["mobillm.bench", "mobillm.bench.paper", "mobillm.bench.micro", "mobillm.bench.ci"]


def native_wanted() -> bool:
    """True when the sources and cmake are here and the user did not opt out."""
    return (os.environ.get("MOBILLM_NATIVE", "1") != "0" and (ROOT / "CMakeLists.txt").is_file()
            and shutil.which("cmake") is not None)


class NativeDistribution(Distribution):
    # A wheel that carries compiled libraries is platform-specific.
    def has_ext_modules(self) -> bool:
        return native_wanted()


class BuildPyWithNative(build_py):
    def run(self) -> None:
        super().run()
        if self.editable_mode:
            return
        if not native_wanted():
            print("mobillm: skipping the native kernels (no CMakeLists.txt or cmake, or MOBILLM_NATIVE=0)")
            return
        self.build_native()

    def build_native(self) -> None:
        build_dir = Path(tempfile.mkdtemp(prefix="mobillm-native-"))
        cuda = "ON" if os.environ.get("MOBILLM_NATIVE_CUDA") == "1" else "OFF"
        steps = [["cmake", "-S", str(ROOT), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
                  f"-DMOBILLM_CUDA={cuda}", "-DMOBILLM_TENSORRT=OFF"],
                 ["cmake", "--build", str(build_dir), "-j", os.environ.get("MOBILLM_NATIVE_JOBS", "2")]]
        try:
            for step in steps:
                subprocess.run(step, check=True, capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.SubprocessError) as e:
            output = getattr(e, "stderr", "") or ""
            print(f"mobillm: native kernels not built ({e}); the in-graph quantizer still works.\n{output[-2000:]}",
                  file=sys.stderr)
            return
        dest = Path(self.build_lib) / "mobillm" / "kernels" / "lib"
        dest.mkdir(parents=True, exist_ok=True)
        built = sorted((build_dir / "lib").glob("*.so"))
        for lib in built:
            shutil.copy2(lib, dest / lib.name)
        shutil.rmtree(build_dir, ignore_errors=True)
        print(f"mobillm: native kernels built: {', '.join(lib.name for lib in built)}")


class EditableWithBench(editable_wheel):
    """`pip install -e .`: pyproject's packages plus BENCH (mapped like the others, PEP 420 portions)."""

    def finalize_options(self) -> None:
        dist = self.distribution
        if (ROOT / "bench").is_dir():
            dist.packages = [*(dist.packages or []), *(name for name in BENCH if name not in (dist.packages or []))]
            # bench/<folder> follows from the mapping of mobillm.bench
            dist.package_dir = {**(dist.package_dir or {}), "mobillm.bench": "bench"}
        super().finalize_options()


setup(distclass=NativeDistribution, cmdclass={"build_py": BuildPyWithNative, "editable_wheel": EditableWithBench})
