"""CMake's default CUDA architectures (kernels/cuda/cuda_archs.cmake): Jetson Xavier (72) and Orin
(87) whenever the nvcc can build them, and H100/H200 (90). Runs the CMake function in script mode,
fed the `nvcc --version` text of each CUDA release; no CUDA needed."""

import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "kernels" / "cuda" / "cuda_archs.cmake"


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
@pytest.mark.parametrize("release, archs", [
    ("11.4, V11.4.315", "72;87"),  # JetPack 5 (Xavier and Orin): no sm_90 before CUDA 11.8
    ("12.6, V12.6.68", "72;87;90"),  # JetPack 6, desktop CUDA 12
    ("13.0, V13.0.48", "87;90"),  # CUDA 13 dropped sm_72
])
def test_default_architectures_follow_the_nvcc_release(tmp_path, release, archs):
    probe = tmp_path / "probe.cmake"
    probe.write_text(f'include("{SCRIPT.as_posix()}")\n'
                     f'mobillm_default_cuda_archs("Cuda compilation tools, release {release}" out)\n'
                     'message("ARCHS=${out}")\n')
    proc = subprocess.run(["cmake", "-P", str(probe)], capture_output=True, text=True, check=True)
    assert f"ARCHS={archs}" in proc.stderr
