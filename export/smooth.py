"""Outlier migration (SmoothQuant, Xiao et al., ICML 2023) before int8/int4 weight quantization.

ORT's int8 engine quantizes each MatMul's input per tensor (DynamicQuantizeLinear), so one channel
at 1e4 leaves the other channels a handful of levels. For each group of Linear layers that read
the same activation X, per-channel factors

    s_j = max|X_j|^alpha / max|W_:,j|^(1 - alpha)

divide X_j (folded into whatever produces X: the preceding norm's weight, or the rows of the
Linear whose output feeds X through a multiplicative or positively homogeneous op) and multiply
column j of every Linear reading X. The fp32 function is unchanged (up to fp32 rounding).

Groups, per decoder layer:
    Gemma 3:  input_layernorm -> q,k,v;  pre_feedforward_layernorm -> gate,up;  up (x gelu(gate)) -> down
              (Gemma3RMSNorm scales by 1 + weight: the new weight is (1 + w) / s - 1)
    Llama:    input_layernorm -> q,k,v;  post_attention_layernorm -> gate,up;  up -> down
    OPT:      self_attn_layer_norm -> q,k,v;  final_layer_norm -> fc1;  fc1 (relu) -> fc2
A group is migrated only where its activation has outliers: max_j max|X_j| >= OUTLIER_RATIO x the
median channel's (measured on the calibration rows; each group's figure goes to the manifest).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .options import ExportError

OUTLIER_RATIO = 8.0


class CalibrationError(ExportError):
    """Calibration that cannot give finite factors (exit 2)."""


@dataclass
class Group:
    name: str
    source: object  # the norm module, or the Linear whose output rows produce X
    kind: str  # "rmsnorm1p" (Gemma: 1 + weight), "norm" (weight [and bias]), "linear_rows"
    readers: list  # Linear modules reading X


def groups(base, family_name: str) -> list[Group]:
    """The migratable groups of a base model, bottom to top."""
    out = []
    if family_name == "opt":
        config = base.config
        pre_norm = getattr(config, "do_layer_norm_before", True)  # opt-350m norms after: nothing to fold into
        relu = getattr(config, "activation_function", "relu") == "relu"  # relu(x / s) == relu(x) / s for s > 0
        for i, layer in enumerate(base.decoder.layers):
            a = layer.self_attn
            if pre_norm:
                out.append(Group(f"layer{i}.qkv", layer.self_attn_layer_norm, "norm",
                                 [a.q_proj, a.k_proj, a.v_proj]))
                out.append(Group(f"layer{i}.fc1", layer.final_layer_norm, "norm", [layer.fc1]))
            if relu:
                out.append(Group(f"layer{i}.fc2", layer.fc1, "linear_rows", [layer.fc2]))
        return out
    if family_name in ("gemma3", "llama"):
        for i, layer in enumerate(base.layers):
            a, m = layer.self_attn, layer.mlp
            kind = "rmsnorm1p" if family_name == "gemma3" else "norm"
            ffn_norm = layer.pre_feedforward_layernorm if family_name == "gemma3" else layer.post_attention_layernorm
            out.append(Group(f"layer{i}.qkv", layer.input_layernorm, kind, [a.q_proj, a.k_proj, a.v_proj]))
            out.append(Group(f"layer{i}.gate_up", ffn_norm, kind, [m.gate_proj, m.up_proj]))
            out.append(Group(f"layer{i}.down", m.up_proj, "linear_rows", [m.down_proj]))
        return out
    return []


def activation_absmax(base, family, tokenizer, texts: list[str], gs: list[Group], max_len: int = 128) -> list:
    """Per group: float64 [in_features] max |X_j| over the real tokens of every calibration row."""
    import torch

    maxima = [None] * len(gs)
    hooks = []
    for k, g in enumerate(gs):
        def hook(module, inputs, k=k):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).abs().amax(0).double()
            maxima[k] = x if maxima[k] is None else torch.maximum(maxima[k], x)
        hooks.append(g.readers[0].register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for text in texts:  # one row at a time: no padding reaches the statistics
                ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :max_len]
                mask = torch.ones_like(ids)
                base(input_ids=ids, attention_mask=mask, position_ids=family.position_ids(mask), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    width = [g.readers[0].in_features for g in gs]
    return [np.zeros(w) if m is None else m.numpy() for m, w in zip(maxima, width)]


def factors(x_max: np.ndarray, readers, alpha: float) -> np.ndarray:
    """s_j; a channel never active in the calibration (or with an all-zero weight column) keeps s_j = 1.
    NaN activations give NaN factors (the caller refuses them)."""
    w_max = np.max([r.weight.detach().abs().amax(0).double().numpy() for r in readers], axis=0)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        s = x_max**alpha / w_max ** (1 - alpha)
    return np.where((x_max == 0) | (w_max == 0), 1.0, s)


def apply(group: Group, s: np.ndarray) -> None:
    """Divide X by s (in its source) and multiply the readers' input columns by s, in place."""
    import torch

    with torch.no_grad():
        t = torch.from_numpy(s)
        for r in group.readers:
            r.weight.mul_(t.to(r.weight.dtype)[None, :])
        src = group.source
        if group.kind == "rmsnorm1p":
            src.weight.copy_(((1.0 + src.weight.double()) / t - 1.0).to(src.weight.dtype))
        elif group.kind == "norm":
            src.weight.div_(t.to(src.weight.dtype))
            if getattr(src, "bias", None) is not None:
                src.bias.div_(t.to(src.bias.dtype))
        else:  # linear rows: the output channel j of `src` is X_j (times a gate, or through relu)
            src.weight.div_(t.to(src.weight.dtype)[:, None])
            if src.bias is not None:
                src.bias.div_(t.to(src.bias.dtype))


def migrate(base, family, tokenizer, alpha: float, texts: list[str], source: dict,
            progress: bool = True) -> dict | None:
    """Measure each group's activation outliers on the calibration `texts` (export/calibrate.py's
    `calibration_texts`, whose record is `source`) and migrate them where the ratio reaches
    OUTLIER_RATIO; returns the manifest record (None for a family without groups)."""
    import sys

    gs = groups(base, family.name)
    if not gs:
        return None
    x_max = activation_absmax(base, family, tokenizer, texts, gs)
    record = {"method": "smoothquant", "alpha": alpha, "outlier_ratio": OUTLIER_RATIO,
              "calibration": source.get("calibration"), "calibration_sha256": source.get("sha256"),
              "calibration_rows": len(texts), "groups": []}
    migrated = 0
    for g, xm in zip(gs, x_max):
        median = float(np.median(xm))
        ratio = float(xm.max() / median) if median > 0 else math.inf
        entry = {"group": g.name, "absmax": float(xm.max()), "median_absmax": median,
                 "ratio": ratio if math.isfinite(ratio) else None, "migrated": False}
        if not texts or not np.any(xm > 0) or not np.isfinite(ratio) or ratio >= OUTLIER_RATIO:
            s = factors(xm, g.readers, alpha)
            if not texts or not np.any(xm > 0) or not np.all(np.isfinite(s)) or not np.all(s > 0):
                bad = int(np.sum(~np.isfinite(s) | ~(s > 0)))
                raise CalibrationError(
                    f"outlier migration: {bad} non-finite or zero factors in {g.name} from {len(texts)} calibration "
                    f"rows ({record['calibration']}); is the calibration set empty or all padding? give "
                    f"--calibration FILE with a few hundred rows of text")
            apply(g, s)
            entry.update(migrated=True, factor_min=float(s.min()), factor_max=float(s.max()))
            migrated += 1
        record["groups"].append(entry)
    if progress:
        print(f"smooth: {migrated} of {len(gs)} groups migrated (outlier ratio >= {OUTLIER_RATIO:g}, alpha {alpha:g}, "
              f"{len(texts)} calibration rows)", file=sys.stderr, flush=True)
    return record
