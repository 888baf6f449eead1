"""Per-block vs per-tensor scales on real taps: relative RMS error of each format.

Runs the export's own tapped torch module (the taps an engine quantizes, tap norm included)
on SST-2 dev sentences, batch by batch, and quantizes each tap tensor as the device sends it:
`tokens` (every real token of the batch) and `pooled` (each row's last token). Per-tensor
scaling (block size 0) takes one absmax per such tensor. Prints one markdown table.

    python -m mobillm.bench.micro.tap_scale_error --model gemma-3-270m --batches 4
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
import torch

from mobillm.bench.paths import GLUE
from mobillm.export.options import ExportOptions
from mobillm.export.pipeline import make_plan
from mobillm.export.source import build_model
from mobillm.export.tapped import TappedDecoder
from mobillm.kernels import codec

FORMATS = ("int8", "fp8", "int4", "nf4", "fp4")
SCALINGS = (codec.DEFAULT_BLOCK_SIZE, codec.PER_TENSOR)
DEV = GLUE / "SST-2" / "dev.tsv"


def sentences(path: Path, n: int) -> list[str]:
    with open(path, newline="", encoding="utf-8") as f:
        return [row["sentence"] for row, _ in zip(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE), range(n))]


def tap_tensors(plan, model: TappedDecoder, texts: list[str], batch: int, mode: str):
    """Yield, per batch, the list of tap tensors [rows, hidden] (fp32) the device would quantize."""
    for start in range(0, len(texts), batch):
        enc = plan.tokenizer(texts[start:start + batch], padding=True, truncation=True, max_length=128,
                             return_tensors="pt")
        mask = enc["attention_mask"]
        with torch.no_grad():
            taps = model(enc["input_ids"], mask)
        lengths = mask.sum(1)
        if mode == "pooled":  # right padding: each row's last real token
            keep = [(i, int(n) - 1) for i, n in enumerate(lengths)]
        else:
            keep = [(i, t) for i, n in enumerate(lengths) for t in range(int(n))]
        rows, cols = zip(*keep)
        yield [t[list(rows), list(cols)].float().numpy() for t in taps]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gemma-3-270m", help="export-backbone model name (weights must be local)")
    p.add_argument("--batches", type=int, default=4, help="batches of SST-2 dev sentences")
    p.add_argument("--batch-size", type=int, default=16, help="sentences per batch (one tap tensor per batch)")
    p.add_argument("--data", type=Path, default=DEV, help="a GLUE SST-2 style TSV with a sentence column")
    args = p.parse_args(argv)
    plan = make_plan(ExportOptions(model=args.model, out=Path("/nonexistent-out"), progress=False))
    texts = sentences(args.data, args.batches * args.batch_size)
    print(f"model={args.model} taps={plan.options.tap_layers} tap_norm={plan.options.tap_norm} "
          f"sentences={len(texts)} batch={args.batch_size}\n")
    print("| format | tokens B=64 | tokens per-tensor | pooled B=64 | pooled per-tensor |\n|---|---|---|---|---|")
    opts = plan.options
    model = TappedDecoder(build_model(plan.source, plan.config, opts.seed, "fp32"), plan.family, opts.tap_layers,
                          torch.float32, opts.tap_norm).eval()
    sums = {}
    for mode in ("tokens", "pooled"):
        for taps in tap_tensors(plan, model, texts, args.batch_size, mode):
            for x in taps:
                for fmt in FORMATS:
                    for b in SCALINGS:
                        err = codec.decode(codec.encode(x, fmt, b)) - x
                        e2, x2 = sums.get((mode, fmt, b), (0.0, 0.0))
                        sums[(mode, fmt, b)] = (e2 + float(np.sum(err.astype(np.float64) ** 2)),
                                                x2 + float(np.sum(x.astype(np.float64) ** 2)))
    for fmt in FORMATS:
        cells = [np.sqrt(sums[(m, fmt, b)][0] / sums[(m, fmt, b)][1]) for m in ("tokens", "pooled") for b in SCALINGS]
        print(f"| {fmt} | " + " | ".join(f"{c:.3e}" for c in cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
