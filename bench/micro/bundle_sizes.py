"""Bundle size per weight format, and that each bundle's logits equal `edge-run predict`'s.

    python -m mobillm.bench.micro.bundle_sizes --make-tiny /tmp/sizes            # tiny random OPT, every --weights
    python -m mobillm.bench.micro.bundle_sizes --engine E1 --engine E2 --side-for E1=S1 ...   (real engines; a side each)

For each engine: engine files (graph + weights), bundle files (model.onnx, tokenizer.json), and the
largest |bundle - predict| logit difference on five sentences. Prints one JSON object
(docs/bundle.md, "Sizes").
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from mobillm.bench.micro.serve_latency import random_side
from mobillm.bench.paths import TOKENIZER

TEXTS = ["a gripping, funny film", "the most boring two hours of my life", "ok",
         "an utterly forgettable, if well-meaning, attempt at comedy", "i laughed, i cried, i bought the soundtrack"]


def tiny_engines(folder: Path) -> list[tuple[Path, Path]]:
    """Tiny random OPT engines, one per --weights format, each with a random side network."""
    from mobillm.common.sample import TINY_OPT
    from mobillm.export.pipeline import export_engine

    out = []
    for weights in ("fp32", "fp16", "int8", "int4"):
        engine = folder / f"engine-{weights}"
        if not engine.is_dir():
            export_engine("opt-125m", engine, random_init=True, overrides={**TINY_OPT, "hidden_size": 256,
                                                                         "ffn_dim": 1024, "num_attention_heads": 4},
                          quant="nf4", weights=weights, progress=False, tokenizer=TOKENIZER)
        out.append((engine, random_side(engine, folder / f"side-{weights}.onnx")))
    return out


def measure(engine: Path, side: Path, work: Path) -> dict:
    from mobillm.common.manifest import Manifest
    from mobillm.edge_runtime import cli
    from mobillm.edge_runtime.bundle import BundleModel

    m = Manifest.load(engine, verify=False)
    bundle = work / f"bundle-{engine.name}"
    assert cli.main(["bundle", "--engine", str(engine), "--side", str(side), "--out", str(bundle)]) == 0
    preds = work / "p.jsonl"
    # One text per batch: with int8 weights the activations are quantized per tensor (ORT dynamic
    # quantization), so a padded batch changes every row a little, in predict and bundle alike.
    assert cli.main(["predict", "--engine", str(engine), "--side", str(side), "--out", str(preds), "-q",
                     "--batch-size", "1", *TEXTS]) == 0
    want = np.array([json.loads(line)["logits"] for line in preds.read_text().splitlines()])
    model = BundleModel(bundle)
    got = np.concatenate([model.logits([model.tokenize((t,))]) for t in TEXTS])
    engine_files = [engine / m.graph] + ([engine / m.external_data] if m.external_data else [])
    return {"engine": str(engine), "model": m.model_id, "weights": m.weights,
            "engine_graph_mb": round(sum(f.stat().st_size for f in engine_files) / 1e6, 2),
            "bundle_model_onnx_mb": round(sum(f.stat().st_size for f in bundle.glob("model.onnx*")) / 1e6, 2),
            "bundle_total_mb": round(sum(f.stat().st_size for f in bundle.iterdir()) / 1e6, 2),
            "side_mb": round(side.stat().st_size / 1e6, 3),
            "max_abs_logit_diff_vs_predict": float(np.abs(got - want).max())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--make-tiny", type=Path, default=None, metavar="DIR")
    ap.add_argument("--engine", type=Path, action="append", default=[])
    ap.add_argument("--side", type=Path, action="append", default=[],
                    help="one per --engine, same order (default: untrained side networks, made here)")
    args = ap.parse_args()
    sides = args.side or [random_side(e, Path(tempfile.mkdtemp()) / "side.onnx") for e in args.engine]
    pairs = list(zip(args.engine, sides))
    if args.make_tiny:
        args.make_tiny.mkdir(parents=True, exist_ok=True)
        pairs += tiny_engines(args.make_tiny)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(e, s, Path(tmp)) for e, s in pairs]
    print(json.dumps({"loadavg": os.getloadavg(), "bundles": rows}, indent=2))


if __name__ == "__main__":
    main()
