"""How many cached epochs, at which learning rate: the side network on cached taps, scored per epoch.

    python -m mobillm.bench.paper.cache_schedule --engine ENGINE --out docs/runs/cache_schedule.json

The rows are exactly bench/paper/compare.py's (same settings: `--train-rows`, `--holdout-rows`, `--dev-rows`,
`--data-seed`, `--max-len`): the engine's summary rows of every train, holdout and dev row are
computed once (ORT, the device's path, decoded from the wire format as the server decodes them) and
kept in `--work`; then, per configuration and seed, the project's own side network is trained as a
`--cache` server trains it (AdamW, warm-up 6 %, linear decay to 0 over the declared epochs, batches
of `--batch-size` in a seeded order per epoch) and scored on the holdout rows (train rows, never
trained on) and on dev after every epoch, with the task's metric (accuracy, MCC, Pearson, ...).

It answers what the parity harness cannot afford to sweep: how the declared epoch count (which sets
the decay) and the peak learning rate move the holdout and dev metrics. The choice the server makes
(`trainer serve --cache --epochs-from-holdout`) is made on held-out *train* rows only; the dev
column here is for the report, never for choosing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def compute_taps(args, work: Path) -> dict:
    """Decoded summary rows [rows * 2, hidden] per tap for train, holdout and dev (cached in --work)."""
    from mobillm.bench.paper.compare_config import Settings
    from mobillm.bench.paper.compare_data import prepare_data
    from mobillm.bench.paper.compare_workers import Data
    from mobillm.edge_runtime.backbone import Backbone
    from mobillm.kernels import codec

    cache = work / "taps.npz"
    if cache.is_file():
        z = np.load(cache)
        return {k: z[k] for k in z.files}
    s = Settings(task=args.task, train_rows=args.train_rows, holdout_rows=args.holdout_rows, dev_rows=args.dev_rows,
                 max_len=args.max_len, batch_size=args.batch_size, data_seed=args.data_seed)
    prep = prepare_data(s, args.engine, work)
    data = Data(prep["data"])
    bb = Backbone(args.engine, threads=args.threads)
    if not bb.manifest.summary_row:
        raise SystemExit(f"{args.engine}: no summary row in this engine (export it with --summary-row)")
    out = {}
    for name, rows, labels in (("train", data.train, data.train_labels), ("holdout", data.holdout, data.holdout_labels),
                               ("dev", data.dev, data.dev_labels)):
        taps = [[] for _ in bb.manifest.taps]
        t0 = time.perf_counter()
        for a in range(0, len(rows), args.batch_size):
            outs, _ = bb.forward(rows[a:a + args.batch_size], keep="summary")
            for k, t in enumerate(outs):
                taps[k].append(codec.decode_arrays(t.codes, t.scales, t.spec.fmt, t.spec.hidden, t.spec.block_size))
        print(f"{name}: {len(rows)} rows in {time.perf_counter() - t0:.1f} s", flush=True)
        for k, parts in enumerate(taps):
            out[f"{name}_tap{k}"] = np.concatenate(parts).astype(np.float32)
        out[f"{name}_labels"] = labels
    out["widths"] = np.array([t.hidden for t in bb.manifest.taps])
    out["out_dim"] = np.array(prep["task"]["out_dim"])
    np.savez(cache, **out)
    return out


def split(taps: dict, name: str) -> tuple[list, np.ndarray]:
    n = len(taps["widths"])
    return [taps[f"{name}_tap{k}"] for k in range(n)], taps[f"{name}_labels"]


def logits_of(model, rows: list, batch: int = 256) -> np.ndarray:
    import torch

    model.eval()
    n, out = len(rows[0]) // 2, []
    with torch.no_grad():
        for a in range(0, n, batch):
            b = min(n, a + batch)
            inputs = [torch.from_numpy(t[2 * a:2 * b]) for t in rows]
            out.append(model.logits_from_rows(inputs, torch.full((b - a,), 2, dtype=torch.long)).numpy())
    model.train()
    return np.concatenate(out)


def scored(task_name: str, out_dim: int):
    """The task as the server scores it (its preset's metric: accuracy, MCC, Pearson, ...)."""
    from mobillm.trainer.core import scored_task

    return scored_task(task_name, "regression" if out_dim == 1 else "class", out_dim)


def metric_of(task, outputs: np.ndarray, labels: np.ndarray) -> float:
    from mobillm.common import tasks

    return float(tasks.score(task, outputs, labels)[task.metric])


def train(taps: dict, epochs: int, lr: float, seed: int, batch: int, side_overrides: dict,
          task_name: str = "sst2") -> tuple[list[dict], object]:
    """One cached-epoch schedule: the task metric after every epoch, and the trained network."""
    import torch

    from mobillm.trainer.config import OptimConfig, SideConfig
    from mobillm.trainer.core import WarmupLinear, make_optimizer
    from mobillm.trainer.model import build_side_network, task_loss

    rows, labels = split(taps, "train")
    hold, hold_labels = split(taps, "holdout")
    dev, dev_labels = split(taps, "dev")
    side = SideConfig(pooling="mean", **side_overrides).for_taps([int(w) for w in taps["widths"]], int(taps["out_dim"]))
    optim = OptimConfig(lr=lr, seed=seed)
    model = build_side_network(side, seed)
    opt = make_optimizer(model, optim)
    task = scored(task_name, int(taps["out_dim"]))
    n = len(labels)
    steps_per_epoch = -(-n // batch)
    schedule = WarmupLinear(round(optim.warmup_ratio * epochs * n), epochs * n)
    done, curve = 0, []
    t0 = time.perf_counter()
    for epoch in range(epochs):
        order = np.random.default_rng([seed, epoch]).permutation(n)
        for s in range(steps_per_epoch):
            idx = order[s * batch:(s + 1) * batch]
            pick = np.stack([2 * idx, 2 * idx + 1], 1).reshape(-1)
            inputs = [torch.from_numpy(t[pick]) for t in rows]
            for g in opt.param_groups:
                g["lr"] = lr * schedule.factor(done)
            logits = model.logits_from_rows(inputs, torch.full((len(idx),), 2, dtype=torch.long))
            loss = task_loss(logits, torch.from_numpy(labels[idx]), task.kind)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)
            opt.step()
            done += len(idx)
        curve.append({"epoch": epoch + 1, "holdout": metric_of(task, logits_of(model, hold), hold_labels),
                      "dev": metric_of(task, logits_of(model, dev), dev_labels), "train_s": time.perf_counter() - t0})
    return curve, model


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", type=Path, required=True)
    p.add_argument("--task", default="sst2")
    p.add_argument("--train-rows", type=int, default=4000)
    p.add_argument("--holdout-rows", type=int, default=400)
    p.add_argument("--dev-rows", type=int, default=872)
    p.add_argument("--max-len", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--epochs", default="2,3,5,8,12", help="declared epoch counts (the decay ends at each)")
    p.add_argument("--lrs", default="0.001", help="peak learning rates")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--side", default="{}", help="SideConfig overrides as JSON, e.g. '{\"bottleneck\": 128}'")
    p.add_argument("--ensemble", type=int, default=1,
                   help="also score ensembles (logits averaged) of each run of K consecutive seeds: trainer serve "
                        "--ensemble K; --seeds must hold a multiple of K")
    p.add_argument("--by", default=None, metavar="COLUMN",
                   help="also score dev per value of this column of the dev file (e.g. genre for STS-B), beside "
                        "each value's share of the train and dev rows")
    p.add_argument("--work", type=Path, default=Path("/tmp/cache_schedule"))
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    taps = compute_taps(args, args.work)
    side = json.loads(args.side)
    groups = column_values(args.work, args.by, taps) if args.by else None
    seeds = [int(x) for x in args.seeds.split(",")]
    if args.ensemble < 1 or len(seeds) % args.ensemble:
        raise SystemExit(f"--ensemble {args.ensemble}: --seeds must hold a multiple of it ({len(seeds)} given)")
    task = scored(args.task, int(taps["out_dim"]))
    results, ensembles = [], []
    for lr in [float(x) for x in args.lrs.split(",")]:
        for epochs in [int(x) for x in args.epochs.split(",")]:
            outs: dict = {"holdout": [], "dev": []}
            for seed in seeds:
                curve, model = train(taps, epochs, lr, seed, args.batch_size, side, args.task)
                results.append({"lr": lr, "epochs": epochs, "seed": seed, "side": side, "curve": curve})
                for name in outs:
                    outs[name].append(logits_of(model, split(taps, name)[0]))
                if groups:
                    dev_out, dev_labels, dev_groups = outs["dev"][-1], split(taps, "dev")[1], groups["dev"]
                    results[-1]["dev_by"] = {g: metric_of(task, dev_out[dev_groups == g], dev_labels[dev_groups == g])
                                             for g in sorted(set(dev_groups))}
                last = curve[-1]
                best = max(curve, key=lambda c: (c["holdout"], c["epoch"]))
                print(f"lr {lr:g} epochs {epochs:2d} seed {seed}: end holdout {last['holdout']:.3f} dev {last['dev']:.3f}"
                      f" | holdout-best epoch {best['epoch']} dev {best['dev']:.3f} | {last['train_s']:.1f} s",
                      flush=True)
            for g in range(0, len(seeds), args.ensemble) if args.ensemble > 1 else ():
                group = {"lr": lr, "epochs": epochs, "seeds": seeds[g:g + args.ensemble], "side": side}
                for name in outs:
                    mean = np.mean(outs[name][g:g + args.ensemble], axis=0)
                    group[name] = metric_of(task, mean, split(taps, name)[1])
                ensembles.append(group)
                print(f"lr {lr:g} epochs {epochs:2d} ensemble of seeds {group['seeds']}: holdout {group['holdout']:.3f}"
                      f" dev {group['dev']:.3f}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"settings": {k: str(v) if isinstance(v, Path) else v
                                                 for k, v in vars(args).items()}, "runs": results,
                                    "ensembles": ensembles}, indent=1))
    print(table(results))
    if groups:
        print(by_table(results, groups))
    if ensembles:
        print(ensemble_table(ensembles))
    return 0


def column_values(work: Path, column: str, taps: dict) -> dict[str, np.ndarray]:
    """Per split (train, dev): the `column` value of every row, read from the subset files in --work (the taps'
    row order); a value spelled differently across splits (STS-B: main-forum / main-forums) is kept as is."""
    import csv

    out = {}
    for name in ("train", "dev"):
        with open(work / f"{name}.tsv", newline="", encoding="utf-8-sig") as f:  # MRPC starts with a BOM
            rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
        if not rows or column not in rows[0]:
            raise SystemExit(f"--by {column}: no such column in {work / f'{name}.tsv'}")
        values = np.array([r[column] for r in rows])
        if len(values) != len(taps[f"{name}_labels"]):
            raise SystemExit(f"--by {column}: {work / f'{name}.tsv'} has {len(values)} rows, the taps "
                             f"{len(taps[f'{name}_labels'])}")
        out[name] = values
    return out


def by_table(results: list[dict], groups: dict[str, np.ndarray]) -> str:
    """Dev metric per column value, mean ± sd over seeds, per (lr, epochs); each value's row shares."""
    values = sorted(set(groups["dev"]))
    share = {name: {v: float(np.mean(groups[name] == v)) for v in set(groups[name])} for name in groups}
    head = " | ".join(f"{v} (train {share['train'].get(v, 0):.0%}, dev {share['dev'][v]:.0%})" for v in values)
    train_only = [f"{v} {share['train'][v]:.0%}" for v in sorted(share["train"]) if v not in share["dev"]]
    lines = ([f"train rows whose value no dev row has: {', '.join(train_only)}"] if train_only else []) + [
        f"| lr | declared epochs | {head} |", "|---|---|" + "---|" * len(values)]
    by: dict = {}
    for r in results:
        by.setdefault((r["lr"], r["epochs"]), []).append(r["dev_by"])
    for (lr, epochs), runs in sorted(by.items()):
        cells = [np.array([run[v] for run in runs]) for v in values]
        lines.append(f"| {lr:g} | {epochs} | " + " | ".join(f"{c.mean():.3f} ± {sd(c):.3f}" for c in cells) + " |")
    return "\n".join(lines)


def sd(values: np.ndarray) -> float:
    return float(values.std(ddof=1)) if len(values) > 1 else 0.0


def ensemble_table(ensembles: list[dict]) -> str:
    """Mean over the seed groups per (lr, epochs): single networks against their ensembles."""
    groups: dict = {}
    for e in ensembles:
        groups.setdefault((e["lr"], e["epochs"]), []).append(e)
    lines = ["| lr | declared epochs | ensembles | holdout (mean ± sd) | dev (mean ± sd) |", "|---|---|---|---|---|"]
    for (lr, epochs), es in sorted(groups.items()):
        h, d = np.array([e["holdout"] for e in es]), np.array([e["dev"] for e in es])
        lines.append(f"| {lr:g} | {epochs} | {len(es)} of {len(es[0]['seeds'])} | {h.mean():.3f} ± {sd(h):.3f} | "
                     f"{d.mean():.3f} ± {sd(d):.3f} |")
    return "\n".join(lines)


def table(results: list[dict]) -> str:
    """Mean over seeds per (lr, epochs, side): the metrics at the end of the schedule."""
    groups: dict = {}
    for r in results:
        groups.setdefault((r["lr"], r["epochs"], json.dumps(r["side"])), []).append(r["curve"][-1])
    lines = ["| lr | declared epochs | side | holdout at the end (mean ± sd) | dev at the end (mean ± sd) | seeds |",
             "|---|---|---|---|---|---|"]
    for (lr, epochs, side), ends in sorted(groups.items()):
        h, d = np.array([e["holdout"] for e in ends]), np.array([e["dev"] for e in ends])
        lines.append(f"| {lr:g} | {epochs} | {side} | {h.mean():.3f} ± {h.std(ddof=1) if len(h) > 1 else 0:.3f} | "
                     f"{d.mean():.3f} ± {d.std(ddof=1) if len(d) > 1 else 0:.3f} | {len(ends)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
