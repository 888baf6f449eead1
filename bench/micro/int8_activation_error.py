"""What ORT's dynamic int8 kernel costs each MatMul of a model: a torch simulation on calibration rows.

    python -m mobillm.bench.micro.int8_activation_error gemma-3-270m --calibration FILE --rows 48 --alpha 0.5 \
        --out docs/runs/int8_activation_error_gemma.json

`quantize_dynamic` engines quantize every MatMul input per call and per tensor to uint8
(DynamicQuantizeLinear: one step for the whole [batch x seq, K] input) and the weights per output
channel to int8. This script loads the model as `export-backbone` does, applies the same outlier
migration (export/smooth.py, `--alpha`; 0: none), runs `--rows` calibration rows in batches of
`--batch` (left-padded by the model's tokenizer, as the device batches rows: the range spans the
batch), and reports per Linear the relative RMS error of its output with (a) uint8 per-tensor
activations and per-channel int8 weights, (b) the activations alone. Calibration text only, never
a dev set. It shows whether a few MatMuls carry the loss (keep them apart) or all do (change the
activation grid: `--int8-kernel blocks`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def dynamic_uint8(x):
    """DynamicQuantizeLinear then dequantize: one asymmetric uint8 step over the whole tensor (0 kept exact)."""
    import torch

    lo, hi = min(0.0, float(x.min())), max(0.0, float(x.max()))
    step = (hi - lo) / 255 or 1.0
    zero = round(-lo / step)
    return (torch.clamp(torch.round(x / step) + zero, 0, 255) - zero) * step


def per_channel_int8(w):
    """Symmetric int8, one scale per output channel (quantize_dynamic's per_channel=True)."""
    import torch

    scale = w.abs().amax(1, keepdim=True) / 127
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return torch.round(w / scale).clamp(-127, 127) * scale


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a model export-backbone takes (a GGUF short name such as gemma-3-270m)")
    p.add_argument("--calibration", type=Path, default=None, help="calibration text (default: built-in sentences)")
    p.add_argument("--rows", type=int, default=48)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--max-len", type=int, default=64)
    p.add_argument("--alpha", type=float, default=0.5, help="outlier migration strength (0: none)")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    import torch

    from mobillm.export import calibrate, smooth
    from mobillm.export.options import ExportOptions
    from mobillm.export.pipeline import make_plan
    from mobillm.export.source import build_model

    plan = make_plan(ExportOptions(model=a.model, out=a.out.with_suffix(".unused"), weights="int8",
                                   calibration=a.calibration, calibration_rows=max(a.rows, 128), progress=False))
    model = build_model(plan.source, plan.config, 0, "fp32")
    texts, record = calibrate.calibration_texts(plan.options.calibration, None, max(a.rows, 128))
    if a.alpha > 0:
        smooth.migrate(model, plan.family, plan.tokenizer, a.alpha, texts, record)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in f".{n}"}
    weights_q = {n: per_channel_int8(m.weight.detach()) for n, m in linears.items()}
    errors: dict[str, list] = {n: [] for n in linears}

    def hook(name):
        def record_error(module, inputs, output):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1])
            y = output.detach().reshape(-1, output.shape[-1])
            if module.bias is not None:
                y = y - module.bias
            xq = dynamic_uint8(x)
            errors[name].append((float((xq @ weights_q[name].T - y).norm() / y.norm()),
                                 float((xq @ module.weight.T - y).norm() / y.norm())))
        return record_error

    hooks = [m.register_forward_hook(hook(n)) for n, m in linears.items()]
    rows = texts[:a.rows]
    with torch.no_grad():
        for i in range(0, len(rows), a.batch):
            enc = plan.tokenizer(rows[i:i + a.batch], return_tensors="pt", padding=True, truncation=True,
                                 max_length=a.max_len)
            mask = enc["attention_mask"]
            model(input_ids=enc["input_ids"], attention_mask=mask, position_ids=plan.family.position_ids(mask),
                  use_cache=False)
    for h in hooks:
        h.remove()
    per = {n: np.mean(v, axis=0).tolist() for n, v in errors.items()}
    both = np.array([v[0] for v in per.values()])
    print(f"{len(per)} MatMuls, {len(rows)} calibration rows in batches of {a.batch}, alpha {a.alpha:g}: relative RMS "
          f"output error (uint8 per-tensor activations + per-channel int8 weights) median {np.median(both):.4f}, "
          f"max {both.max():.4f}, share of MatMuls above 2 x the median {np.mean(both > 2 * np.median(both)):.2f}")
    print("| MatMul | activations + weights | activations only |\n|---|---|---|")
    for n, (e, act) in sorted(per.items(), key=lambda kv: -kv[1][0])[:15]:
        print(f"| {n} | {e:.4f} | {act:.4f} |")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"command": "python -m mobillm.bench.micro.int8_activation_error " + " ".join(argv or sys.argv[1:]),
                                 "alpha": a.alpha, "rows": len(rows), "batch": a.batch,
                                 "error": {n: {"activations_and_weights": e, "activations_only": act}
                                           for n, (e, act) in per.items()}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
