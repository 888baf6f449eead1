"""Checking an implementation of the formats against the reference codec (kernels/codec.py).

The native CPU kernel's tests (tests/kernels/test_native.py) and the GPU check
(bench/gpu_check.py) feed the same kind of activations to their implementation and to
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


def zero_nonfinite_blocks(x: np.ndarray, block_size: int) -> np.ndarray:
    """x with every block holding NaN/Inf set to zero: a fused kernel's codes for such a block
    are those of a zero block (its scale is NaN instead)."""
    x32 = x.astype(np.float32)
    for b in range(codec.n_blocks(x.shape[-1], block_size)):
        block = x32[..., b * block_size:(b + 1) * block_size]
        block[~np.isfinite(block).all(axis=-1)] = 0
    return x32.astype(x.dtype)
