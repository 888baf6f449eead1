"""The torch module that is traced to ONNX: a decoder that returns only the tapped hidden states."""

from __future__ import annotations

import torch

from .families import TAP_NORMS, Family


class TappedDecoder(torch.nn.Module):
    """(input_ids, attention_mask) -> tuple of HF `hidden_states[layer]` for each tapped layer.

    The 4D mask and position ids are built here from plain tensor ops, so the trace has no
    Python branches on shapes and every batch size and sequence length gives the same graph.
    """

    def __init__(self, base: torch.nn.Module, family: Family, layers: list[int], dtype: torch.dtype,
                 tap_norm: str = "none"):
        super().__init__()
        self.base = base
        self.family = family
        self.layers = list(layers)
        self.dtype = dtype
        self.tap_norm = tap_norm
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
        return tuple(normalize_tap(out.hidden_states[layer], self.tap_norm, norm)
                     for layer, norm in zip(self.layers, self.norms))


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
    if tap_norm not in TAP_NORMS:
        raise ValueError(f"tap_norm {tap_norm!r} unknown; choose one of {', '.join(TAP_NORMS)}")
    if tap_norm == "none":
        return hidden
    x = hidden.float()
    return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)).to(hidden.dtype)
