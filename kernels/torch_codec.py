"""The codec in torch, vectorised, for the server (CPU or CUDA). Mirrors `codec.py` exactly.

Decode is the hot path on the server (every received tap goes through it); encode exists
so the server can simulate the device and so the tests can check both directions.
"""

from __future__ import annotations

import torch

from . import codec

_TABLES: dict[tuple[str, torch.device], torch.Tensor] = {}


def code_table(fmt: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """fp32 value of each unpacked code (cached per device)."""
    key = (codec.check_format(fmt), torch.device(device))
    if key not in _TABLES:
        _TABLES[key] = torch.from_numpy(codec.code_values(fmt).copy()).to(key[1])
    return _TABLES[key]


def unpack_nibbles(packed: torch.Tensor, hidden: int) -> torch.Tensor:
    """[..., ceil(H/2)] uint8 -> [..., H] codes (int64, ready for indexing)."""
    lo = (packed & 0x0F).long()
    hi = (packed >> 4).long()
    return torch.stack([lo, hi], dim=-1).flatten(-2)[..., :hidden]


def decode(codes: torch.Tensor, scales: torch.Tensor, fmt: str, hidden: int, block_size: int) -> torch.Tensor:
    """Dequantize uint8 codes + fp16 scales to fp32 [..., hidden] on the codes' device."""
    fmt = codec.check_format(fmt)
    if fmt == "fp16":
        return codes.view(torch.float16).float() if codes.dtype != torch.float16 else codes.float()
    if codec.BITS[fmt] == 4:
        idx = unpack_nibbles(codes, hidden)
    else:
        idx = codes.long()
    values = code_table(fmt, codes.device)[idx]
    scale = scales.float().repeat_interleave(codec.row_block_size(hidden, block_size), dim=-1)[..., :hidden]
    return values * scale


def encode(x: torch.Tensor, fmt: str, block_size: int = codec.DEFAULT_BLOCK_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize x [..., H] to (codes uint8, scales fp16), bit-identical to `codec.encode`.

    Non-finite blocks get a NaN scale (the caller decides whether that is an error).
    """
    fmt = codec.check_format(fmt)
    hidden = x.shape[-1]
    xf = x.float()
    if fmt == "fp16":
        return xf.clamp(-codec.FP16_MAX, codec.FP16_MAX).half(), xf.new_zeros(x.shape[:-1] + (0,), dtype=torch.float16)
    per_tensor = block_size == codec.PER_TENSOR
    nb, block_size = codec.n_blocks(hidden, block_size), codec.row_block_size(hidden, block_size)
    xb = torch.nn.functional.pad(xf, (0, nb * block_size - hidden)).unflatten(-1, (nb, block_size))
    dims = tuple(range(xb.ndim)) if per_tensor else (-1,)
    finite = torch.isfinite(xb).all(dim=-1)
    absmax = torch.where(torch.isfinite(xb), xb, 0).abs().amax(dim=dims, keepdim=True)[..., 0].expand(xb.shape[:-1])
    if per_tensor:
        finite = finite.all().expand(xb.shape[:-1])
    qmax = codec.QMAX[fmt]
    scale16 = torch.clamp_max(absmax / qmax, codec.FP16_MAX).half()
    scales = torch.where(finite, scale16, torch.full_like(scale16, float("nan")))
    sf = scale16.float().unsqueeze(-1)
    y = torch.where(sf == 0, torch.zeros_like(xb), xb / torch.where(sf == 0, torch.ones_like(sf), sf))
    y = y.clamp(-qmax, qmax).flatten(-2)[..., :hidden]
    codes = _codes(y, fmt)
    if codec.BITS[fmt] == 4:
        if hidden % 2:
            codes = torch.nn.functional.pad(codes, (0, 1))
        codes = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return codes.to(torch.uint8), scales


def _codes(y: torch.Tensor, fmt: str) -> torch.Tensor:
    if fmt == "int8":
        return torch.round(y).to(torch.int16) & 0xFF  # two's complement byte
    if fmt == "int4":
        return torch.round(y).to(torch.int16) + 8
    if fmt == "nf4":
        thresholds = torch.from_numpy(codec.NF4_THRESHOLDS.copy()).to(y.device)
        return torch.bucketize(y.contiguous(), thresholds, right=False).to(torch.int16)  # count of thresholds < y
    if fmt == "fp4":
        return _fp4_codes(y)
    a = y.abs()
    e = torch.floor(torch.log2(a.clamp_min(2.0**-10))).to(torch.int32)
    one = torch.ones_like(a)
    e = torch.where(torch.ldexp(one, e) > a, e - 1, e)
    e = torch.where(torch.ldexp(one, e + 1) <= a, e + 1, e)
    exp = e.clamp_min(-6)
    quantum = torch.ldexp(one, exp - 3)
    r = torch.round(a / quantum) * quantum
    er = torch.where(r >= torch.ldexp(one, exp + 1), exp + 1, exp)
    bits = 8 * (er + 6) + (r / torch.ldexp(one, er - 3)).to(torch.int32)
    bits = bits + torch.where((y < 0) & (r > 0), 128, 0)
    return bits.to(torch.int16)


def _fp4_codes(y: torch.Tensor) -> torch.Tensor:
    """codec._fp4_codes: midpoints passed (ties where FP4_TIE_UP), sign bit for nonzero codes."""
    mid = torch.from_numpy(codec.FP4_MIDPOINTS.copy()).to(y.device)
    tie_up = torch.from_numpy(codec.FP4_TIE_UP.copy()).to(y.device)
    a = y.abs().unsqueeze(-1)
    mag = torch.where(tie_up, a >= mid, a > mid).sum(dim=-1).to(torch.int16)
    return mag + torch.where((y < 0) & (mag > 0), 8, 0).to(torch.int16)
