"""The torch module that is traced to ONNX: a decoder that returns only the tapped hidden states."""

from __future__ import annotations

import numpy as np
import torch

from .families import TAP_NORMS, Family


class TappedDecoder(torch.nn.Module):
    """(input_ids, attention_mask) -> tuple of HF `hidden_states[layer]` for each tapped layer.

    The 4D mask and position ids are built here from plain tensor ops, so the trace has no
    Python branches on shapes and every batch size and sequence length gives the same graph.
    """

    def __init__(self, base: torch.nn.Module, family: Family, layers: list[int], dtype: torch.dtype,
                 tap_norm: str = "none", summary_row: bool = False, stats: "TapStats | None" = None):
        super().__init__()
        self.base = base
        self.family = family
        self.layers = list(layers)
        self.dtype = dtype
        self.tap_norm = tap_norm
        self.summary_row = summary_row
        self.stats = stats
        self.layer_masks = family.layer_masks(base.config) if family.layer_masks else None
        self.norms = tap_norms(base, family, self.layers, tap_norm)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        position_ids = self.family.position_ids(attention_mask)
        idx = torch.arange(input_ids.shape[1], device=input_ids.device)
        causal = idx[None, :] <= idx[:, None]
        # Each position may also see itself, so a padded query never has an all-masked row
        # (that would give NaN under fp16, and NaN leaks into real rows through 0 * NaN).
        allowed = causal[None, None] & (attention_mask[:, None, None, :].bool() | (idx[None, :] == idx[:, None]))
        mask = torch.where(allowed, 0.0, torch.finfo(self.dtype).min).to(self.dtype)
        if self.layer_masks is not None:
            mask = self.layer_masks(mask)
        out = self.base(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                        output_hidden_states=True, use_cache=False)
        return tuple(prepare_tap(out.hidden_states[layer], attention_mask, self.tap_norm, norm, self.summary_row,
                                 self.stats, k)
                     for k, (layer, norm) in enumerate(zip(self.layers, self.norms)))


class TapStats:
    """Per-tap, per-channel mean and spread of the normalized taps, measured at export on calibration
    rows (`--tap-norm channel`): one pair for token rows, one for summary rows (the masked mean of a
    row's tokens, whose channels vary less). Saved beside the graph as `STATS_NAME`."""

    def __init__(self, arrays: dict[str, "np.ndarray"]):
        self.arrays = arrays

    def tensors(self, k: int, which: str) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.from_numpy(self.arrays[f"tap{k}_{which}_mean"]),
                torch.from_numpy(self.arrays[f"tap{k}_{which}_std"]))


def prepare_tap(hidden: torch.Tensor, mask: torch.Tensor, tap_norm: str, norm: torch.nn.Module | None = None,
                summary_row: bool = False, stats: TapStats | None = None, k: int = 0) -> torch.Tensor:
    """What tap `k` carries [B, T (+1), H]: the normalized hidden state of every position, then with
    `summary_row` one more position, the masked mean of the row's real tokens; with `stats`
    ("channel" taps) every channel standardized, tokens and the summary row each by their own
    calibrated mean and spread, so no channel's outliers set a whole quantization block's scale."""
    x = normalize_tap(hidden, tap_norm, norm)
    if summary_row:
        # A [B, 1, T] x [B, T, H] product: ORT's transformer fusions leave a MatMul alone (a Mul and
        # ReduceSum on the normalized tap broke their topological sort on Gemma's graph).
        m = mask.to(x.dtype)
        mean = torch.bmm((m / m.sum(1, keepdim=True).clamp_min(1.0))[:, None, :], x)
    if stats is not None:
        mu, sd = stats.tensors(k, "token")
        x = ((x.float() - mu) / sd).to(x.dtype)
        if summary_row:
            mu, sd = stats.tensors(k, "summary")
            mean = ((mean.float() - mu) / sd).to(x.dtype)
    return torch.cat([x, mean], dim=1) if summary_row else x


def tap_norms(base: torch.nn.Module, family: Family, layers: list[int], tap_norm: str) -> list:
    """For "layer" taps, the module each tap goes through: layer L's output is what decoder layer
    L + 1 reads, through its input norm; the final layer's output is already after the final norm."""
    if tap_norm != "layer":
        return [None] * len(layers)
    if family.input_norms is None:
        raise ValueError(f"--tap-norm layer: the {family.name} family row names no input norms")
    norms = family.input_norms(base)
    return [norms[layer] if layer < len(norms) else None for layer in layers]



def normalize_tap(hidden: torch.Tensor, tap_norm: str, norm: torch.nn.Module | None = None) -> torch.Tensor:
    """What a tap carries: the residual stream as is ("none"), divided by its RMS over the hidden
    dim ("rms"), or passed through the next layer's input norm `norm` ("layer"; None: as is).

    "rms" keeps every direction and only drops each token's overall scale, which the side
    network's LayerNorm discards anyway; it brings Gemma 3's 1e5 outliers into fp16 range.
    "layer" also applies the next layer's learned per-channel scale, which in Gemma 3 shrinks
    the massive dimensions 10-50x relative to the rest: the tap is what that layer sees.
    """
    if tap_norm == "layer":
        return hidden if norm is None else norm(hidden)
    if tap_norm == "channel":  # per token by RMS here; per channel by TapStats in prepare_tap
        tap_norm = "rms"
    if tap_norm not in TAP_NORMS:
        raise ValueError(f"tap_norm {tap_norm!r} unknown; choose one of {', '.join(TAP_NORMS)}")
    if tap_norm == "none":
        return hidden
    x = hidden.float()
    return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)).to(hidden.dtype)
