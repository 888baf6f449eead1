"""Reference codec for tapped activations: the specification, in numpy.

Every other implementation (the in-graph ONNX form, torch on the server, the C++/CUDA
kernels) is tested bit for bit against this module. `docs/formats.md` describes the same
rules in prose.

Layout. An activation `x` has shape [..., H]. Each row (the last axis) is cut into blocks
of `block_size` consecutive elements; the last block of a row may be short. Each block has
one fp16 `scale`; every code in it decodes to `value(code) * scale`.

Encoding a block, identically in every implementation:
1. `absmax = max |x|` in fp32 (fp16 inputs are widened to fp32 first, exactly).
2. `scale = fp16(min(absmax / QMAX, 65504))` with fp32 division and round-to-nearest-even.
3. `y = x / float32(scale)` (fp32 division), or `y = 0` where `scale == 0`;
   then `y` is clamped to [-QMAX, QMAX].
4. `y` is mapped to a code by the format's rule (`int8`, `int4`, `fp8`, `nf4`, `fp4`).
A block holding NaN or +-Inf gets `scale = NaN`; `encode` raises instead of returning it.

Per-tensor scaling (`block_size == PER_TENSOR`, i.e. 0; the MobiLLM paper's scheme): the whole
tensor is one block. Steps 1-3 run once over every element; each row then holds one scale,
the tensor's (scales [..., 1], all equal), so rows can still be sliced and cached one by one;
the wire carries that scale once per tap (common/wire.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import BadInput

FORMATS = ("int8", "fp8", "int4", "nf4", "fp16", "fp4")  # new formats go at the end: ids never move
# Each format's number, in one order: the C API counts from 0 (enum mobillm_format in
# kernels/cpp/block_quant.h), the wire from 1 (common/wire.py; 0 is never a valid tap format).
FORMAT_CODES = {fmt: i for i, fmt in enumerate(FORMATS)}
WIRE_FORMAT_IDS = {fmt: code + 1 for fmt, code in FORMAT_CODES.items()}
DEFAULT_BLOCK_SIZE = 64
PER_TENSOR = 0  # block_size meaning "one scale for the whole tensor"
FP16_MAX = 65504.0

# QLoRA's NormalFloat4 table (Dettmers et al. 2023), as fp32.
NF4_TABLE = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=np.float32,
)
# Decision thresholds between neighbouring entries, in fp32. A value equal to a threshold
# takes the lower code (code = number of thresholds strictly below y).
NF4_THRESHOLDS = ((NF4_TABLE[:-1].astype(np.float64) + NF4_TABLE[1:]) / 2).astype(np.float32)


def _e4m3_table() -> np.ndarray:
    """Value of each of the 256 OCP FP8 E4M3FN bit patterns (0x7F and 0xFF are NaN)."""
    bits = np.arange(256)
    sign = np.where(bits & 0x80, -1.0, 1.0)
    exp = (bits >> 3) & 0xF
    man = bits & 0x7
    mag = np.where(exp == 0, man / 8.0 * 2.0**-6, (1 + man / 8.0) * 2.0 ** (exp - 7.0))
    table = (sign * mag).astype(np.float32)
    table[(bits & 0x7F) == 0x7F] = np.nan
    return table


FP8_TABLE = _e4m3_table()
INT4_TABLE = np.arange(-8, 8, dtype=np.float32)  # nibble n decodes to n - 8 (n = 0 unused)

# FP4 E2M1 (our reading of the MobiLLM paper's Eq. 2; docs/formats.md): bit 3 the sign, bits 0-2
# the magnitude, one of eight values. Nibble 8 (-0) is never produced; it decodes to -0.0.
FP4_MAGNITUDES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=np.float32)
FP4_TABLE = np.concatenate([FP4_MAGNITUDES, -FP4_MAGNITUDES])
# Midpoints between neighbouring magnitudes (exact in fp32). A |y| equal to a midpoint takes the
# neighbour with the even code (round half to even, as IEEE): the upper one at odd indices.
FP4_MIDPOINTS = ((FP4_MAGNITUDES[:-1] + FP4_MAGNITUDES[1:]) / 2).astype(np.float32)
FP4_TIE_UP = np.arange(len(FP4_MIDPOINTS)) % 2 == 1

# Largest |y| each format represents: the block absmax maps onto it.
QMAX = {"int8": 127.0, "int4": 7.0, "fp8": 448.0, "nf4": 1.0, "fp4": 6.0}
BITS = {"int8": 8, "fp8": 8, "int4": 4, "nf4": 4, "fp16": 16, "fp4": 4}


class NonFiniteActivation(BadInput, ValueError):
    """An activation holds NaN or Inf; it is never quantized or sent."""


@dataclass(frozen=True)
class Encoded:
    """One quantized tensor: packed codes, per-block scales, and what is needed to decode."""

    fmt: str
    block_size: int
    hidden: int
    codes: np.ndarray  # uint8 [..., code_bytes(fmt, hidden)] (fp16 format: float16 [..., hidden])
    scales: np.ndarray  # float16 [..., n_blocks(hidden, block_size)] (fp16 format: [..., 0])

    @property
    def nbytes(self) -> int:
        """Bytes sent: a per-tensor scale travels once (2 bytes), not once per row."""
        per_tensor = self.block_size == PER_TENSOR and self.scales.size
        return int(self.codes.nbytes + (2 if per_tensor else self.scales.nbytes))


def check_format(fmt: str) -> str:
    """Return the canonical name of `fmt` ('none' is an alias of 'fp16'); raise on unknown."""
    fmt = "fp16" if fmt == "none" else fmt
    if fmt not in FORMATS:
        raise ValueError(f"unknown quant format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return fmt


def n_blocks(hidden: int, block_size: int) -> int:
    """Number of scales each row of `hidden` elements holds (per-tensor: 1, the tensor's)."""
    return 1 if block_size == PER_TENSOR else -(-hidden // block_size)


def row_block_size(hidden: int, block_size: int) -> int:
    """The block length within a row: `block_size`, or the whole row for per-tensor scaling."""
    return hidden if block_size == PER_TENSOR else block_size


def code_bytes(fmt: str, hidden: int) -> int:
    """Bytes of packed codes per row (fp16: the raw values)."""
    bits = BITS[check_format(fmt)]
    return hidden * 2 if bits == 16 else -(-hidden * bits // 8)


def bytes_per_row(fmt: str, hidden: int, block_size: int) -> int:
    """Bytes on the wire for one row (token) of one tap, scales included (a per-tensor scale is
    2 bytes per tap per batch, not per row, and is left out)."""
    fmt = check_format(fmt)
    scale_bytes = 0 if fmt == "fp16" or block_size == PER_TENSOR else 2 * n_blocks(hidden, block_size)
    return code_bytes(fmt, hidden) + scale_bytes


def _blocked(x: np.ndarray, block_size: int) -> np.ndarray:
    """View x [..., H] as [..., nb, block_size], zero-padding the short last block."""
    hidden = x.shape[-1]
    nb = n_blocks(hidden, block_size)
    pad = nb * block_size - hidden
    if pad:
        x = np.concatenate([x, np.zeros(x.shape[:-1] + (pad,), dtype=x.dtype)], axis=-1)
    return x.reshape(x.shape[:-1] + (nb, block_size))


def block_scales(x: np.ndarray, fmt: str, block_size: int) -> np.ndarray:
    """fp16 scale per block (NaN for a block with a non-finite value); steps 1-2 above.
    Per-tensor: [..., 1], every row holding the tensor's one scale."""
    x = np.asarray(x, dtype=np.float32)
    xb = _blocked(x, row_block_size(x.shape[-1], block_size))
    axes = tuple(range(xb.ndim)) if block_size == PER_TENSOR else -1
    finite = np.isfinite(xb).all(axis=axes, keepdims=True)[..., 0]
    absmax = np.abs(np.where(np.isfinite(xb), xb, 0)).max(axis=axes, keepdims=True)[..., 0]
    scale = np.minimum(absmax / np.float32(QMAX[fmt]), np.float32(FP16_MAX)).astype(np.float16)
    return np.broadcast_to(np.where(finite, scale, np.float16(np.nan)), xb.shape[:-1]).copy()


def _fp8_bits(y: np.ndarray) -> np.ndarray:
    """E4M3FN bit pattern of y (|y| <= 448), round-to-nearest-even; zero is always 0x00."""
    a = np.abs(y)
    e = np.floor(np.log2(np.maximum(a, np.float32(2.0**-10)))).astype(np.int32)
    # log2 may be off by one ulp near powers of two; correct it exactly.
    e = np.where(np.ldexp(np.float32(1), e) > a, e - 1, e)
    e = np.where(np.ldexp(np.float32(1), e + 1) <= a, e + 1, e)
    exp = np.maximum(e, -6)
    quantum = np.ldexp(np.float32(1), exp - 3)
    r = np.rint(a / quantum) * quantum
    er = np.where(r >= np.ldexp(np.float32(1), exp + 1), exp + 1, exp)  # mantissa carried
    er = np.maximum(er, -6)
    bits = 8 * (er + 6) + (r / np.ldexp(np.float32(1), er - 3)).astype(np.int32)
    bits = bits + np.where((y < 0) & (r > 0), 128, 0)
    return bits.astype(np.uint8)


def _fp4_codes(y: np.ndarray) -> np.ndarray:
    """E2M1 nibble of y (|y| <= 6): the magnitude code counts the midpoints |y| passes (at a
    midpoint: passes it where FP4_TIE_UP); the sign bit only for a nonzero code (zero is 0x0)."""
    a = np.abs(y)[..., None]
    mag = np.where(FP4_TIE_UP, a >= FP4_MIDPOINTS, a > FP4_MIDPOINTS).sum(axis=-1)
    return (mag + np.where((y < 0) & (mag > 0), 8, 0)).astype(np.uint8)


def quantize_codes(y: np.ndarray, fmt: str) -> np.ndarray:
    """Unpacked code per element of the scaled, clamped y (step 4): uint8 0..255 or 0..15."""
    if fmt == "int8":
        return np.rint(y).astype(np.int8).view(np.uint8)
    if fmt == "int4":
        return (np.rint(y).astype(np.int32) + 8).astype(np.uint8)
    if fmt == "nf4":
        return (y[..., None] > NF4_THRESHOLDS).sum(axis=-1).astype(np.uint8)
    if fmt == "fp8":
        return _fp8_bits(y)
    if fmt == "fp4":
        return _fp4_codes(y)
    raise ValueError(f"no codes for format {fmt!r}")


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """Two 4-bit codes per byte, element 2i in the low nibble; an odd row ends with a 0 nibble."""
    if codes.shape[-1] % 2:
        codes = np.concatenate([codes, np.zeros(codes.shape[:-1] + (1,), np.uint8)], axis=-1)
    pairs = codes.reshape(codes.shape[:-1] + (-1, 2))
    return (pairs[..., 0] | (pairs[..., 1] << 4)).astype(np.uint8)


def unpack_nibbles(packed: np.ndarray, hidden: int) -> np.ndarray:
    """Inverse of `pack_nibbles`: [..., ceil(H/2)] bytes -> [..., H] codes."""
    lo = packed & 0x0F
    hi = packed >> 4
    return np.stack([lo, hi], axis=-1).reshape(packed.shape[:-1] + (-1,))[..., :hidden]


def encode(x: np.ndarray, fmt: str, block_size: int = DEFAULT_BLOCK_SIZE, name: str = "tensor") -> Encoded:
    """Quantize x [..., H] (fp32 or fp16); `block_size` PER_TENSOR (0): one scale for all of x.
    Raises NonFiniteActivation naming `name` on NaN/Inf."""
    fmt = check_format(fmt)
    if block_size < 0:
        raise ValueError(f"block_size must be >= 1, or 0 for one scale per tensor; got {block_size}")
    x = np.asarray(x)
    if x.dtype not in (np.float32, np.float16):
        raise TypeError(f"{name}: expected float32 or float16, got {x.dtype}")
    if x.ndim < 1 or x.shape[-1] < 1:
        raise ValueError(f"{name}: expected shape [..., H] with H >= 1, got {x.shape}")
    hidden = x.shape[-1]
    if not np.isfinite(x).all():
        bad = np.argwhere(~np.isfinite(x))[0]
        raise NonFiniteActivation(f"{name}: non-finite value {x[tuple(bad)]} at index {tuple(int(i) for i in bad)}")
    if fmt == "fp16":
        raw = np.clip(x.astype(np.float32), -FP16_MAX, FP16_MAX).astype(np.float16)  # saturate, never inf
        return Encoded(fmt, block_size, hidden, raw, np.zeros(x.shape[:-1] + (0,), np.float16))
    x32 = x.astype(np.float32)
    scales = block_scales(x32, fmt, block_size)
    s = scales.astype(np.float32)[..., None]
    xb = _blocked(x32, row_block_size(hidden, block_size))
    with np.errstate(divide="ignore", invalid="ignore"):
        y = np.where(s == 0, np.float32(0), xb / np.where(s == 0, np.float32(1), s))
    qmax = np.float32(QMAX[fmt])
    y = np.clip(y, -qmax, qmax).reshape(x.shape[:-1] + (-1,))[..., :hidden]
    codes = quantize_codes(y, fmt)
    if BITS[fmt] == 4:
        codes = pack_nibbles(codes)
    return Encoded(fmt, block_size, hidden, codes, scales)


def code_values(fmt: str) -> np.ndarray:
    """Decoded value (before scaling) of each unpacked code, as an fp32 lookup table."""
    fmt = check_format(fmt)
    if fmt == "int8":
        return np.arange(256, dtype=np.uint8).view(np.int8).astype(np.float32)
    return {"int4": INT4_TABLE, "nf4": NF4_TABLE, "fp8": FP8_TABLE, "fp4": FP4_TABLE}[fmt]


def decode(enc: Encoded) -> np.ndarray:
    """Dequantize to fp32: value(code) * scale, per element."""
    return decode_arrays(enc.codes, enc.scales, enc.fmt, enc.hidden, enc.block_size)


def decode_arrays(codes: np.ndarray, scales: np.ndarray, fmt: str, hidden: int, block_size: int) -> np.ndarray:
    """Dequantize raw arrays (as they arrive from a graph or the wire) to fp32 [..., hidden]."""
    fmt = check_format(fmt)
    if fmt == "fp16":
        return np.asarray(codes).view(np.float16).reshape(codes.shape[:-1] + (-1,)).astype(np.float32)
    codes = np.asarray(codes, dtype=np.uint8)
    if BITS[fmt] == 4:
        codes = unpack_nibbles(codes, hidden)
    values = code_values(fmt)[codes]
    scale = np.repeat(np.asarray(scales).astype(np.float32), row_block_size(hidden, block_size), axis=-1)[..., :hidden]
    return values * scale


def relative_rms_error(x: np.ndarray, fmt: str, block_size: int = DEFAULT_BLOCK_SIZE) -> float:
    """||decode(encode(x)) - x|| / ||x||, the error figure docs/formats.md reports."""
    x = np.asarray(x, dtype=np.float32)
    err = decode(encode(x, fmt, block_size)) - x
    return float(np.sqrt(np.mean(err.astype(np.float64) ** 2) / np.mean(x.astype(np.float64) ** 2)))
