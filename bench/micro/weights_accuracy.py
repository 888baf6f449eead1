"""One side network, many weight formats: is an engine's accuracy the fp32 engine's?

    python -m mobillm.bench.micro.weights_accuracy --engine fp32=ENGINE_FP32 --engine gguf=ENGINE_GGUF --engine int8=... \
        --out docs/runs/weights_accuracy.json

Each engine runs SST-2 rows (text stripped of its trailing space, docs/benchmarks.md) in ONNX
Runtime exactly as the device does (`Backbone.forward`, pooled: the last token of each row, taps
quantized in the graph and decoded with the reference codec). The first engine's train taps train
the project's SideNetwork (its own optimizer recipe and loss, in this process); that one network is
then scored on every engine's dev taps. So the accuracy gap between engines is only what their
weights do to the taps. Also printed per engine: each tap's relative RMS difference from the first
engine's decoded taps, and how often the predictions agree with the first engine's.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from mobillm.bench.paths import GLUE

SST2 = GLUE / "SST-2"


def read_rows(path: Path, limit: int | None) -> tuple[list[str], np.ndarray]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[:limit]
    return [r["sentence"].strip() for r in rows], np.array([int(r["label"]) for r in rows])


def engine_taps(engine: Path, texts: list[str], max_len: int, batch: int, threads: int) -> tuple[np.ndarray, float]:
    """(float32 [rows, taps, width] decoded last-token taps, seconds of forward)."""
    from mobillm.edge_runtime.backbone import Backbone
    from mobillm.kernels import codec

    bb = Backbone(engine, threads=threads)
    ids = [bb.tokenize((t,), max_len)[0] for t in texts]
    order = np.argsort([len(r) for r in ids], kind="stable")
    out = None
    t0 = time.perf_counter()
    for start in range(0, len(order), batch):
        idx = order[start:start + batch]
        taps, _ = bb.forward([ids[i] for i in idx], keep="pooled")
        dec = np.stack([codec.decode_arrays(t.codes, t.scales, t.spec.fmt, t.spec.hidden, t.spec.block_size)
                        for t in taps], axis=1)
        if out is None:
            out = np.zeros((len(texts),) + dec.shape[1:], np.float32)
        out[idx] = dec
    return out, time.perf_counter() - t0


def train_side(train: np.ndarray, labels: np.ndarray, epochs: int, batch: int, seed: int):
    import torch

    from mobillm.trainer.config import OptimConfig, SideConfig
    from mobillm.trainer.core import make_optimizer
    from mobillm.trainer.model import build_side_network, task_loss

    optim = OptimConfig()
    side = SideConfig().for_taps([train.shape[2]] * train.shape[1], 2)
    model = build_side_network(side, seed)
    opt = make_optimizer(model, optim)
    rng = np.random.default_rng(seed)
    model.train()
    for _ in range(epochs):
        perm = rng.permutation(len(train))
        for start in range(0, len(train), batch):
            idx = perm[start:start + batch]
            inputs = [torch.from_numpy(train[idx, k]) for k in range(train.shape[1])]
            logits = model.logits_from_rows(inputs, torch.ones(len(idx), dtype=torch.long))
            loss = task_loss(logits, torch.from_numpy(labels[idx]), "classification")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)
            opt.step()
    model.eval()
    return model


def predict(model, taps: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        inputs = [torch.from_numpy(taps[:, k]) for k in range(taps.shape[1])]
        return model.logits_from_rows(inputs, torch.ones(len(taps), dtype=torch.long)).argmax(-1).numpy()


def engine_id(folder: Path, a) -> str:
    """What the cached taps depend on: the engine's graph (its checksum in the manifest) and the rows."""
    import hashlib

    files = json.loads((folder / "manifest.json").read_text())["files"]
    key = json.dumps([files, a.train_rows, a.max_len], sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", action="append", required=True, metavar="NAME=DIR",
                   help="an engine; the first one's train taps train the side network")
    p.add_argument("--train-rows", type=int, default=2000)
    p.add_argument("--max-len", type=int, default=64)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seeds", type=int, default=3, help="side networks (seeds 0..N-1), each applied to every engine")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache", type=Path, default=None,
                   help="folder for each engine's decoded taps (npz, keyed by the engine's graph checksum and the rows)")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    engines = [tuple(e.split("=", 1)) for e in a.engine]
    train_x, train_y = read_rows(SST2 / "train.tsv", a.train_rows)
    dev_x, dev_y = read_rows(SST2 / "dev.tsv", None)
    taps, seconds = {}, {}
    for name, folder in engines:
        cached = a.cache / f"{name}-{engine_id(Path(folder), a)}.npz" if a.cache else None
        if cached and cached.exists():
            z = np.load(cached)
            taps[name], seconds[name] = (z["train"], z["dev"]), float(z["seconds"])
            continue
        tr, s1 = engine_taps(Path(folder), train_x, a.max_len, 16, a.threads)
        dv, s2 = engine_taps(Path(folder), dev_x, a.max_len, 16, a.threads)
        taps[name], seconds[name] = (tr, dv), s1 + s2
        if cached:
            cached.parent.mkdir(parents=True, exist_ok=True)
            np.savez(cached, train=tr, dev=dv, seconds=s1 + s2)
        print(f"{name}: taps of {len(tr) + len(dv)} rows in {s1 + s2:.0f} s", flush=True)
    ref = engines[0][0]
    results = {name: {"engine": folder, "forward_s": seconds[name], "accuracy": [], "agreement": [],
                      "tap_rel_rms_vs_ref": [float(np.sqrt(np.mean((taps[name][1][:, k] - taps[ref][1][:, k]) ** 2)
                                                           / np.mean(taps[ref][1][:, k] ** 2)))
                                             for k in range(taps[ref][1].shape[1])]}
               for name, folder in engines}
    for seed in range(a.seeds):
        model = train_side(taps[ref][0], train_y, a.epochs, a.batch, seed)
        base = predict(model, taps[ref][1])
        for name, _ in engines:
            pred = predict(model, taps[name][1])
            results[name]["accuracy"].append(float((pred == dev_y).mean()))
            results[name]["agreement"].append(float((pred == base).mean()))
    for name, r in results.items():
        r["accuracy_mean"] = float(np.mean(r["accuracy"]))
        r["delta_vs_ref_points"] = 100 * (r["accuracy_mean"] - results[ref]["accuracy_mean"])
        print(f"{name:>6}: dev accuracy {r['accuracy_mean']:.4f} ({', '.join(f'{x:.3f}' for x in r['accuracy'])}), "
              f"{r['delta_vs_ref_points']:+.2f} pt vs {ref}, agreement {np.mean(r['agreement']):.3f}, tap rel RMS vs "
              f"{ref} max {max(r['tap_rel_rms_vs_ref']):.2e}", flush=True)
    record = {"command": "python -m mobillm.bench.micro.weights_accuracy " + " ".join(argv or sys.argv[1:]),
              "train_rows": len(train_x), "dev_rows": len(dev_x), "max_len": a.max_len, "epochs": a.epochs,
              "seeds": a.seeds, "load_average": os.getloadavg(), "results": results}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
