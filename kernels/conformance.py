"""Checking an implementation of the formats against the reference codec (kernels/codec.py).

The native CPU kernel's tests (tests/kernels/test_native.py) and the GPU check
(bench/ci/gpu_check.py) feed the same kind of activations to their implementation and to
`codec.encode`, and compare bytes; these are the pieces they share.
"""

from __future__ import annotations

import numpy as np

from . import codec


def same_bytes(a, b) -> bool:
    """True when `a` and `b` have the same shape, dtype and bytes (NaN patterns included)."""
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


def first_difference(a, b) -> str:
    """Where two arrays' bytes first differ, for a mismatch report."""
    a, b = np.ascontiguousarray(a).view(np.uint8).ravel(), np.ascontiguousarray(b).view(np.uint8).ravel()
    if a.shape != b.shape:
        return f"sizes {a.size} vs {b.size}"
    idx = np.flatnonzero(a != b)
    return f"{idx.size} bytes differ, first at byte {idx[0]}: {a[idx[0]]} vs {b[idx[0]]}"


def activations(rng: np.random.Generator, shape, scale: float, *, outliers: bool, fp16: bool,
                zero_blocks: bool) -> np.ndarray:
    """Gaussian activations x `scale`; `outliers`: three channels x300 (LLM-like); `zero_blocks`:
    the first third of every row 0 (zero scales); `fp16`: as float16, clipped to its range."""
    x = rng.standard_normal(shape).astype(np.float32) * np.float32(scale)
    if outliers:
        x[..., rng.integers(0, shape[-1], 3)] *= 300
    if zero_blocks:
        x[..., : shape[-1] // 3] = 0
    return np.clip(x, -6e4, 6e4).astype(np.float16) if fp16 else x


def boundary_values(grid: np.ndarray) -> np.ndarray:
    """Every value of a sorted grid, the midpoints between neighbours, and one fp32 ulp either side."""
    grid = np.unique(grid.astype(np.float32))
    mids = ((grid[:-1].astype(np.float64) + grid[1:]) / 2).astype(np.float32)
    pts = np.concatenate([grid, mids])
    return np.unique(np.concatenate([pts, np.nextafter(pts, np.float32(np.inf)), np.nextafter(pts, np.float32(-np.inf))]))


def rounding_edges(fmt: str) -> np.ndarray:
    """One fp32 row [1, n] for a block-scaled format whose absmax is QMAX, so the scale is exactly 1
    and y == x: every grid value, every tie between neighbours and one ulp either side of each,
    +-0 and the smallest subnormals. Encode it with block_size = n (one block)."""
    qmax = np.float32(codec.QMAX[fmt])
    if fmt in ("int8", "int4"):
        grid = np.arange(-qmax, qmax + 1, dtype=np.float32)
    else:
        grid = codec.code_values(fmt)
        grid = grid[np.isfinite(grid)]
    y = boundary_values(grid)
    y = y[np.abs(y) <= qmax]
    return np.concatenate([[qmax], y, [-0.0, 2.0**-149, -(2.0**-149)]]).astype(np.float32).reshape(1, -1)


def zero_nonfinite_blocks(x: np.ndarray, block_size: int) -> np.ndarray:
    """x with every block holding NaN/Inf set to zero: a fused kernel's codes for such a block
    are those of a zero block (its scale is NaN instead)."""
    x32 = x.astype(np.float32)
    for b in range(codec.n_blocks(x.shape[-1], block_size)):
        block = x32[..., b * block_size:(b + 1) * block_size]
        block[~np.isfinite(block).all(axis=-1)] = 0
    return x32.astype(x.dtype)
