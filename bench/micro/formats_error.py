"""Relative RMS error of each quantization format on three kinds of activations.

Prints the tables quoted in docs/formats.md. Seeded and deterministic:

    python -m mobillm.bench.micro.formats_error

Errors are `codec.relative_rms_error` (||decode(encode(x)) - x|| / ||x||) of the reference
codec, so they hold for every implementation that matches it bit for bit.
"""

from __future__ import annotations

import argparse

import numpy as np

from mobillm.kernels import codec

FORMATS = codec.FORMATS
BLOCK_SIZES = (32, 64, 128, codec.PER_TENSOR)  # 0: one scale for the whole [rows, hidden] tensor
OUTLIER_FRACTION = 0.005
OUTLIER_GAIN = 50.0


def gaussian(rng: np.random.Generator, rows: int, hidden: int) -> np.ndarray:
    """i.i.d. N(0, 1) activations."""
    return rng.standard_normal((rows, hidden)).astype(np.float32)


def heavy_tailed(rng: np.random.Generator, rows: int, hidden: int) -> np.ndarray:
    """i.i.d. Student-t activations with 3 degrees of freedom (finite variance, heavy tails)."""
    return rng.standard_t(3, (rows, hidden)).astype(np.float32)


def outlier_channels(rng: np.random.Generator, rows: int, hidden: int) -> tuple[np.ndarray, np.ndarray]:
    """LLM-like: N(0, 1) with the same few channels (0.5% of them) scaled x50 in every row.

    Returns the activations and the indices of the scaled channels.
    """
    x = gaussian(rng, rows, hidden)
    channels = rng.choice(hidden, size=max(1, round(OUTLIER_FRACTION * hidden)), replace=False)
    x[:, channels] *= np.float32(OUTLIER_GAIN)
    return x, channels


def column(block_size: int) -> str:
    return "tensor" if block_size == codec.PER_TENSOR else f"B={block_size}"


def table(title: str, columns: list[str], cells: dict[str, list[str]]) -> str:
    """A markdown table: one row per format."""
    lines = [f"| {title} | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    lines += [f"| {fmt} | " + " | ".join(row) + " |" for fmt, row in cells.items()]
    return "\n".join(lines)


def relative_rms(err: np.ndarray, x: np.ndarray) -> float:
    """||err|| / ||x||, accumulated in fp64 (as codec.relative_rms_error)."""
    return float(np.sqrt(np.mean(err.astype(np.float64) ** 2) / np.mean(x.astype(np.float64) ** 2)))


def bytes_table(hidden: int) -> str:
    """Bytes per element, scales included, per format and block size."""
    return table("format", [column(b) for b in BLOCK_SIZES], {
        fmt: [f"{codec.bytes_per_row(fmt, hidden, b) / hidden:.6f}" for b in BLOCK_SIZES] for fmt in FORMATS})


def error_table(title: str, x: np.ndarray) -> str:
    """codec.relative_rms_error per format and block size."""
    return table(title, [column(b) for b in BLOCK_SIZES], {
        fmt: [f"{codec.relative_rms_error(x, fmt, b):.3e}" for b in BLOCK_SIZES] for fmt in FORMATS})


def ordinary_channel_table(x: np.ndarray, outliers: np.ndarray) -> str:
    """Error over the non-outlier channels only: what sharing blocks with outliers costs them."""
    keep = np.ones(x.shape[-1], bool)
    keep[outliers] = False

    def err(fmt: str, b: int) -> float:
        return relative_rms((codec.decode(codec.encode(x, fmt, b)) - x)[:, keep], x[:, keep])

    return table("ordinary channels only", [column(b) for b in BLOCK_SIZES], {
        fmt: [f"{err(fmt, b):.3e}" for b in BLOCK_SIZES] for fmt in FORMATS})


def small_magnitude_table(x: np.ndarray, block_size: int = 64) -> str:
    """Relative error of sigma * x as sigma shrinks: where the fp16 scale runs out of range."""
    sigmas = (1.0, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7)
    return table(f"sigma (B={block_size})", [f"{s:g}" for s in sigmas], {
        fmt: [f"{codec.relative_rms_error(x * np.float32(s), fmt, block_size):.3e}" for s in sigmas]
        for fmt in FORMATS})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=256, help="tokens (rows) per distribution")
    parser.add_argument("--hidden", type=int, default=2048, help="hidden size (last axis)")
    parser.add_argument("--seed", type=int, default=0, help="seed of numpy's default_rng")
    args = parser.parse_args(argv)
    n, h = args.rows, args.hidden

    def rng(stream: int) -> np.random.Generator:
        return np.random.default_rng([args.seed, stream])

    x_outliers, outliers = outlier_channels(rng(2), n, h)
    print(f"rows={n} hidden={h} seed={args.seed} numpy={np.__version__}\n")
    print("bytes per element, scales included\n")
    print(bytes_table(h) + "\n")
    print("relative RMS error\n")
    print(error_table("gaussian N(0,1)", gaussian(rng(0), n, h)) + "\n")
    print(error_table("student-t, 3 dof", heavy_tailed(rng(1), n, h)) + "\n")
    print(error_table("0.5% channels x50", x_outliers) + "\n")
    print(ordinary_channel_table(x_outliers, outliers) + "\n")
    print("relative RMS error of small activations: N(0, sigma^2) (fp16 scale underflow)\n")
    print(small_magnitude_table(gaussian(rng(3), n, h)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
