"""This process's memory as the kernel counts it (/proc/<pid>/status), in MiB.

The device's peak RSS is a headline number (docs/benchmarks.md), so every reader of it (the
device runtime, the benchmarks, the load tests) uses this one. Linux only; elsewhere 0.0.
"""

from __future__ import annotations

from pathlib import Path


def status_mb(field: str = "VmHWM", pid: int | str = "self") -> float:
    """A memory field of /proc/<pid>/status in MiB: VmHWM (peak RSS, the default) or VmRSS (now)."""
    try:
        with open(Path("/proc") / str(pid) / "status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return 0.0
    raise KeyError(f"no {field} in /proc/{pid}/status")


def peak_rss_mb(pid: int | str = "self") -> float:
    """Peak resident set size (VmHWM) in MiB."""
    return status_mb("VmHWM", pid)


def rss_mb(pid: int | str = "self") -> float:
    """Current resident set size (VmRSS) in MiB."""
    return status_mb("VmRSS", pid)


def trim_heap() -> bool:
    """Hand the C heap's free pages back to the kernel (glibc `malloc_trim(0)`); False where there is no glibc.

    Loading a large tokenizer.json (Gemma 3's: 33 MB, 262k tokens) leaves ~190 MiB of freed
    allocations that glibc keeps mapped afterwards; trimming before the engine loads keeps them out of
    the device's RSS (docs/benchmarks.md, "Device memory: what loading costs")."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        trim = getattr(libc, "malloc_trim", None)
    except OSError:
        return False
    if trim is None:
        return False
    trim(0)
    return True
