"""The native kernels from Python: find or build the libraries, register the ONNX Runtime
custom ops, and call the fused CPU kernel directly (ctypes).

Libraries (built by the root CMakeLists.txt, see docs/native.md):
  codec         libmobillm_codec.so         fused CPU kernel, C API (kernels/cpp/block_quant.h)
  ort_ops       libmobillm_ort_ops.so       ONNX Runtime custom ops com.mobillm::BlockQuantize(Fp16)
  ort_ops_cuda  libmobillm_ort_ops_cuda.so  the same ops for the CPU and CUDA execution providers
  cuda_codec    libmobillm_cuda_codec.so    CUDA kernel, C API (kernels/cuda/block_quant_cuda.h)
  trt_plugin    libmobillm_trt_plugin.so    TensorRT IPluginV3 plugins BlockQuantize(Fp16)

Searched in order: $MOBILLM_NATIVE_DIR, the installed package (`pip install .` builds them
into mobillm/kernels/lib when cmake and a compiler are there), then the build folders of a
source checkout (build/native/lib, build/lib).

An engine names the op set it needs (OP_DOMAIN, version); the device registers its own
library for it (`register_op_library`), never a binary from the export machine. A library
built for another CPU architecture (read from its ELF header, before any dlopen) is passed
over: an aarch64 device never loads an x86-64 .so, and says so.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import codec

LIBRARIES = {
    "codec": "libmobillm_codec.so",
    "ort_ops": "libmobillm_ort_ops.so",
    "ort_ops_cuda": "libmobillm_ort_ops_cuda.so",
    "cuda_codec": "libmobillm_cuda_codec.so",
    "trt_plugin": "libmobillm_trt_plugin.so",
}
# The com.mobillm op set this mobillm writes into engines and can run (kernels/cpp/ort_op.cpp
# kOpsetVersion); an engine naming a version outside KNOWN_OP_VERSIONS needs a newer mobillm.
OP_DOMAIN = "com.mobillm"
OP_VERSION = 1
KNOWN_OP_VERSIONS = (1,)
PACKAGE_LIB_DIR = Path(__file__).resolve().parent / "lib"
SOURCE_ROOT = Path(__file__).resolve().parent.parent  # the repository, in a checkout or editable install
DEFAULT_BUILD_DIR = SOURCE_ROOT / "build" / "native"


class NativeUnavailable(RuntimeError):
    """A native library is neither built nor buildable here (no cmake, compiler or headers)."""


class OpLibraryUnusable(RuntimeError):
    """The custom-op library cannot serve an engine here; the message says why (missing, built for
    another platform, too old an op set, refused by this onnxruntime)."""


class NativeBuildError(RuntimeError):
    """CMake or the compiler failed on the native sources: a bug to fix, not a missing tool."""


@dataclass(frozen=True)
class LibraryInfo:
    """Where a library is and what it is, for manifests and logs."""

    name: str
    path: Path
    sha256: str
    size: int


def search_dirs() -> list[Path]:
    """Folders searched for the libraries, first match wins."""
    dirs = [Path(os.environ["MOBILLM_NATIVE_DIR"])] if os.environ.get("MOBILLM_NATIVE_DIR") else []
    return dirs + [PACKAGE_LIB_DIR, DEFAULT_BUILD_DIR / "lib", SOURCE_ROOT / "build" / "lib"]


# ELF e_machine values of the architectures mobillm may meet, named as platform.machine() names them.
ELF_MACHINES = {3: "x86", 40: "arm", 62: "x86_64", 183: "aarch64", 243: "riscv64", 21: "ppc64le", 22: "s390x"}
_MACHINE_ALIASES = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64", "armv8l": "aarch64", "i386": "x86",
                    "i686": "x86", "armv7l": "arm", "armv6l": "arm", "ppc64": "ppc64le"}


def this_machine() -> str:
    """This process's CPU architecture, named as ELF_MACHINES names it ("x86_64", "aarch64", ...)."""
    machine = platform.machine().lower()
    return _MACHINE_ALIASES.get(machine, machine)


def library_machine(path: Path | str) -> str | None:
    """The architecture an ELF shared library is built for (its header's e_machine, read without
    loading it), or None for a file that is not ELF or cannot be read."""
    try:
        with open(path, "rb") as f:
            head = f.read(20)
    except OSError:
        return None
    if len(head) < 20 or head[:4] != b"\x7fELF" or head[5] not in (1, 2):
        return None
    (machine,) = struct.unpack_from("<H" if head[5] == 1 else ">H", head, 18)
    return ELF_MACHINES.get(machine, f"ELF machine {machine}")


def foreign_architecture(path: Path | str) -> str | None:
    """Why the library at `path` cannot load here, when its ELF header names another architecture
    (one phrase); None when it is this machine's, or not ELF (the loader then decides)."""
    machine = library_machine(path)
    if machine is None or machine == this_machine():
        return None
    return f"{path} is built for {machine}, this device is {this_machine()}"


def found_libraries(name: str) -> list[Path]:
    """Every copy of library `name` in the search folders, in search order, any architecture."""
    return [folder / LIBRARIES[name] for folder in search_dirs() if (folder / LIBRARIES[name]).is_file()]


def find_library(name: str = "ort_ops") -> Path | None:
    """Path of a built library (`name` is a key of LIBRARIES) for this machine's architecture, or
    None; copies built for another architecture are passed over (see `foreign_architecture`)."""
    return next((path for path in found_libraries(name) if foreign_architecture(path) is None), None)


def can_build() -> bool:
    """True in a source checkout with cmake and a C++ compiler on PATH."""
    return ((SOURCE_ROOT / "CMakeLists.txt").is_file() and shutil.which("cmake") is not None
            and any(shutil.which(c) for c in ("c++", "g++", "clang++")))


def build(build_dir: Path | str = DEFAULT_BUILD_DIR, cuda: bool = False, tensorrt: bool = False,
          jobs: int = 2, timeout: float = 600) -> Path:
    """Configure and build the libraries with CMake (incremental); return the lib folder.

    CUDA and TensorRT parts are off unless asked for, so the default build takes seconds
    of compiler time and needs no GPU toolkit. Raises NativeUnavailable without cmake or a
    compiler, NativeBuildError with the build's output when a step fails.
    """
    if not can_build():
        raise NativeUnavailable("building the native kernels needs a source checkout with CMakeLists.txt, "
                                "cmake and a C++ compiler on PATH")
    build_dir = Path(build_dir)
    on_off = {True: "ON", False: "OFF"}
    steps = [
        ["cmake", "-S", str(SOURCE_ROOT), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
         f"-DMOBILLM_CUDA={on_off[cuda]}", f"-DMOBILLM_TENSORRT={on_off[tensorrt]}"],
        ["cmake", "--build", str(build_dir), "-j", str(jobs)],
    ]
    for step in steps:
        try:
            proc = subprocess.run(step, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise NativeBuildError(f"{' '.join(step)} took over {timeout:.0f} s") from e
        if proc.returncode != 0:
            raise NativeBuildError(f"{' '.join(step)} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return build_dir / "lib"


_ENSURED: dict[tuple[str, Path], Path] = {}


def ensure_library(name: str = "ort_ops", build_dir: Path | str = DEFAULT_BUILD_DIR) -> Path:
    """The library `name`: brought up to date first (incremental CMake build, once per process)
    in a source checkout, else as found.

    Raises NativeUnavailable when it is neither buildable nor built (no cmake or compiler here,
    or a CMake run with -DMOBILLM_ORT=OFF for the custom-op library).
    """
    key = (name, Path(build_dir))
    if key in _ENSURED:
        return _ENSURED[key]
    if can_build():
        cuda = name in ("ort_ops_cuda", "cuda_codec", "trt_plugin")
        lib = build(build_dir, cuda=cuda, tensorrt=name == "trt_plugin") / LIBRARIES[name]
        if lib.is_file():
            _ENSURED[key] = lib
            return lib
    found = find_library(name)
    if found is None:
        hint = " (building it needs cmake and a C++ compiler)" if name.startswith("ort_ops") else ""
        raise NativeUnavailable(f"{LIBRARIES[name]} is not built{hint}; see docs/native.md")
    return found


def sha256(path: Path | str) -> str:
    """Hex sha256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def library_info(name: str = "ort_ops", path: Path | str | None = None) -> LibraryInfo:
    """Path, sha256 and size of a library (found or built)."""
    path = Path(path) if path is not None else ensure_library(name)
    return LibraryInfo(name, path, sha256(path), path.stat().st_size)


def register(session_options, path: Path | str | None = None) -> Path:
    """Register the com.mobillm custom ops with an `onnxruntime.SessionOptions`; return the library used.

    Without `path`: the first libmobillm_ort_ops.so found (see `search_dirs`), else one built now.
    """
    if path is None:
        path = find_library("ort_ops") or ensure_library("ort_ops")
    session_options.register_custom_ops_library(str(path))
    return Path(path)


def op_library_version(path: Path | str) -> int:
    """The com.mobillm op set version a custom-op library implements, read without ONNX Runtime.

    Raises OpLibraryUnusable when the file does not load here (another platform or architecture,
    missing dependencies) or predates op set versions."""
    foreign = foreign_architecture(path)
    if foreign:
        raise OpLibraryUnusable(f"{foreign}: build this device's own (docs/native.md)")
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as exc:
        raise OpLibraryUnusable(f"{path} does not load on this machine ({exc}); it was built for another "
                                f"platform: rebuild it here (docs/native.md)") from None
    try:
        version = lib.mobillm_ort_ops_opset_version
    except AttributeError:
        raise OpLibraryUnusable(f"{path} predates versioned op sets; rebuild it (docs/native.md)") from None
    version.restype = ctypes.c_int
    return int(version())


def register_op_library(session_options, version: int = OP_VERSION, path: Path | str | None = None) -> Path:
    """Register this machine's custom-op library for com.mobillm op set `version` with a
    SessionOptions; return its path. Only looks (see `search_dirs`), never builds.

    Raises OpLibraryUnusable saying why it cannot: not installed, another platform's binary, an
    older op set, or an onnxruntime that refuses it (older than the library's API, 1.21)."""
    path = Path(path) if path is not None else find_library("ort_ops")
    if path is None and found_libraries("ort_ops"):
        other = found_libraries("ort_ops")[0]
        raise OpLibraryUnusable(f"{LIBRARIES['ort_ops']} is here only for another architecture "
                                f"({foreign_architecture(other)}); build this device's own (docs/native.md)")
    if path is None or not path.is_file():
        where = path if path is not None else ", ".join(str(d) for d in search_dirs())
        raise OpLibraryUnusable(f"{LIBRARIES['ort_ops']} is not installed here (looked in {where}); "
                                f"`pip install .` or a CMake build makes it (docs/native.md)")
    have = op_library_version(path)
    if have < version:
        raise OpLibraryUnusable(f"{path} implements {OP_DOMAIN} op set {have}, the engine needs {version}; "
                                f"rebuild it from this mobillm")
    try:
        session_options.register_custom_ops_library(str(path))
    except Exception as exc:  # onnxruntime's pybind errors derive from Exception only
        import onnxruntime

        raise OpLibraryUnusable(f"onnxruntime {onnxruntime.__version__} refused {path}: "
                                f"{str(exc).strip().splitlines()[-1]}") from None
    return path


# --- the fused CPU kernel through ctypes --------------------------------------------------

_CODEC: ctypes.CDLL | None = None


def load_codec(path: Path | str | None = None) -> ctypes.CDLL:
    """The C API of libmobillm_codec.so (`path`, else the first found, else built now), with
    argument types declared; loaded once per process unless a path is given."""
    global _CODEC
    if _CODEC is None or path is not None:
        path = path or find_library("codec") or ensure_library("codec")
        foreign = foreign_architecture(path)
        if foreign:
            raise NativeUnavailable(f"{foreign}; build this machine's own (docs/native.md)")
        lib = ctypes.CDLL(str(path))
        i64, vp, i = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
        lib.mobillm_block_quantize.argtypes = [vp, i, i64, i64, i, i64, vp, vp]
        lib.mobillm_block_dequantize.argtypes = [vp, vp, i64, i64, i, i64, vp]
        lib.mobillm_codec_isa.restype = ctypes.c_char_p
        lib.mobillm_codec_set_isa.argtypes = [ctypes.c_char_p]
        _CODEC = lib
    return _CODEC


def codec_isa() -> str:
    """Instruction set the CPU kernel runs with ("avx2+f16c", "sse4.2" or "generic")."""
    return load_codec().mobillm_codec_isa().decode()


def set_codec_isa(name: str) -> None:
    """Force an instruction set of the CPU kernel for this process (tests compare them)."""
    if load_codec().mobillm_codec_set_isa(name.encode()) != 0:
        raise ValueError(f"instruction set {name!r} is not built or not supported by this processor")


def _pointer(a: np.ndarray) -> ctypes.c_void_p:
    return ctypes.c_void_p(a.ctypes.data)


def quantize(x: np.ndarray, fmt: str, block_size: int = codec.DEFAULT_BLOCK_SIZE,
             out: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(codes, scales) of x [..., H] by the fused kernel, byte for byte codec.encode's.

    Unlike codec.encode, a non-finite block does not raise: its scale is NaN. `out` may pass
    preallocated (codes, scales) arrays of the right shapes and dtypes.
    """
    fmt = codec.check_format(fmt)
    x = np.ascontiguousarray(x)
    if x.dtype not in (np.float32, np.float16):
        raise TypeError(f"expected float32 or float16, got {x.dtype}")
    if x.ndim < 1 or x.shape[-1] < 1 or block_size < 1:
        raise ValueError(f"expected shape [..., H] with H >= 1 and block_size >= 1, got {x.shape}, {block_size}")
    hidden, lead = x.shape[-1], x.shape[:-1]
    if out is None:
        if fmt == "fp16":
            codes = np.empty(lead + (hidden,), np.float16)
            scales = np.empty(lead + (0,), np.float16)
        else:
            codes = np.empty(lead + (codec.code_bytes(fmt, hidden),), np.uint8)
            scales = np.empty(lead + (codec.n_blocks(hidden, block_size),), np.float16)
    else:
        codes, scales = out
    rows = int(np.prod(lead, dtype=np.int64))
    status = load_codec().mobillm_block_quantize(_pointer(x), int(x.dtype == np.float16), rows, hidden,
                                                 codec.FORMAT_CODES[fmt], block_size, _pointer(codes), _pointer(scales))
    if status != 0:
        raise RuntimeError(f"mobillm_block_quantize failed with status {status}")
    return codes, scales


def dequantize(codes: np.ndarray, scales: np.ndarray, fmt: str, hidden: int,
               block_size: int = codec.DEFAULT_BLOCK_SIZE) -> np.ndarray:
    """fp32 [..., hidden] by the native kernel, byte for byte codec.decode_arrays'."""
    fmt = codec.check_format(fmt)
    codes = np.ascontiguousarray(codes)
    scales = np.ascontiguousarray(scales, dtype=np.float16)
    lead = codes.shape[:-1]
    out = np.empty(lead + (hidden,), np.float32)
    rows = int(np.prod(lead, dtype=np.int64))
    status = load_codec().mobillm_block_dequantize(_pointer(codes), _pointer(scales), rows, hidden,
                                                   codec.FORMAT_CODES[fmt], block_size, _pointer(out))
    if status != 0:
        raise RuntimeError(f"mobillm_block_dequantize failed with status {status}")
    return out
