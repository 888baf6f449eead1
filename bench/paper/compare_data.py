"""bench/paper/compare.py's inputs: the engines (exported once into --engines) and the data every method
trains on (the same rows, token ids and batch order, written once to <work>/data.npz).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from mobillm.bench.paper.compare_config import GLUE_DIRS, PLAN_EPOCHS, Settings
from mobillm.bench.paper.compare_harness import limited, log
from mobillm.bench.paths import GLUE, TOKENIZER
from mobillm.common.errors import BadInput


def real_weights(model: str) -> bool:
    """An HF id (org/name), a checkpoint folder or a GGUF (gemma-3-270m, path.gguf): real weights.
    Another short name (opt-350m): random init."""
    from mobillm.export.gguf import is_gguf_name

    return "/" in model or Path(model).is_dir() or is_gguf_name(model)


def ensure_engine(s: Settings, work: Path, weights: str = "fp32") -> Path:
    """The engine for --model/--set/--seed with `weights`, exported once into --engines (or as given
    by --engine / --engine-int8 / --engine-int4)."""
    given = getattr(s, "engine" if weights == "fp32" else f"engine_{weights}")
    if given is not None:
        if not (given / "manifest.json").is_file():
            raise BadInput(f"engine {given} has no manifest.json")
        return given.resolve()
    if s.engine is not None:
        raise BadInput(f"with --engine, give the {weights} engine too (--engine-{weights}) or drop mobillm-{weights}")
    key = json.dumps([s.model, sorted(s.overrides), s.seed, s.quant], sort_keys=True)
    tag = Path(s.model).name + ("" if not s.overrides and not s.seed else f"-{hashlib.sha1(key.encode()).hexdigest()[:8]}")
    out = s.engines / f"{tag}-{s.quant}-{weights}"
    if (out / "manifest.json").is_file():
        return out
    cmd = [sys.executable, "-c", "import sys; from mobillm.export.cli import main; sys.exit(main())", s.model,
           "--out", out, "--weights", weights, "--quant", s.quant, "--seed", s.seed, "--quiet"]
    cmd += [] if real_weights(s.model) else ["--random-init"]
    # Real weights bring their own tokenizer; random-init OPT borrows the shared OPT one.
    tokenizer = s.tokenizer or (TOKENIZER if TOKENIZER.is_dir() and not real_weights(s.model) else None)
    cmd += ["--tokenizer", tokenizer] if tokenizer else []
    for item in s.overrides:
        cmd += ["--set", item]
    log(f"exporting the engine: {' '.join(str(c) for c in cmd[3:])}")
    with open(work / "logs" / f"export-{weights}.log", "w") as f:
        subprocess.run(limited(cmd, s.mem_limit), check=True, stdout=f, stderr=subprocess.STDOUT)
    return out


def subset_file(src: Path, dest: Path, rows: int, seed: int, has_header: bool, holdout: Path | None = None,
                holdout_rows: int = 0) -> Path:
    """`rows` random lines of a TSV (header kept), written as they are (GLUE quoting untouched). With
    `holdout`: the next `holdout_rows` lines of the same seeded permutation go there (disjoint from
    `dest`; `dest` holds the same rows as without a holdout)."""
    lines = src.read_text(encoding="utf-8").splitlines()
    header, body = (lines[:1], lines[1:]) if has_header else ([], lines)
    body = [ln for ln in body if ln.strip()]
    order = np.random.default_rng(seed).permutation(len(body))
    pick = order[: min(rows, len(body))]
    dest.write_text("\n".join(header + [body[i] for i in pick]) + "\n", encoding="utf-8")
    if holdout is not None:
        held = order[len(pick): len(pick) + holdout_rows]
        holdout.write_text("\n".join(header + [body[i] for i in held]) + "\n", encoding="utf-8")
    return dest


def prepare_data(s: Settings, engine: Path, work: Path) -> dict:
    """Train/dev subsets (files for the device) and their token ids + batch plans (data.npz for the rest)."""
    from mobillm.common.sample import write_sample
    from mobillm.common.tasks import get_task
    from mobillm.common.tokenize import EngineTokenizer
    from mobillm.edge_runtime.data import load_examples
    from mobillm.edge_runtime.batches import plan_batches
    from mobillm.common.manifest import Manifest

    task = get_task(s.task)
    folder = s.data_dir or GLUE / GLUE_DIRS.get(task.name, task.name)
    train_src = folder / "train.tsv"
    dev_srcs = {split: folder / f"{split}.tsv" for split in task.dev_splits}  # MNLI: matched and mismatched
    if not (train_src.is_file() and all(f.is_file() for f in dev_srcs.values())):
        if task.name != "sst2":
            raise BadInput(f"no {train_src} / {' / '.join(map(str, dev_srcs.values()))}; pass --data-dir")
        log(f"{folder} not found: using the built-in sentiment sample (mobillm.common.sample)")
        train_src = write_sample(work / "sample_train.tsv", s.train_rows + s.holdout_rows, s.subset_seed)
        dev_srcs = {"dev": write_sample(work / "sample_dev.tsv", s.dev_rows, s.subset_seed + 1)}
    # --train-rows to train on and, after them in the same seeded order, --holdout-rows held out (early
    # stopping is chosen on those, never on dev)
    holdout_file = work / "holdout.tsv"
    train_file = subset_file(train_src, work / "train.tsv", s.train_rows, s.subset_seed, task.has_header,
                             holdout_file, s.holdout_rows)
    # --dev-rows rows of each dev split, each scored on its own (the first is the headline metric)
    dev_files = {split: subset_file(src, work / f"{split}.tsv", s.dev_rows, s.subset_seed, task.has_header)
                 for split, src in dev_srcs.items()}
    manifest = Manifest.load(engine, verify=False)
    tok = EngineTokenizer(engine / manifest.tokenizer_dir, manifest.token_rules)
    limit = min(s.max_len, manifest.max_length)  # as Backbone.tokenize truncates

    def encode(path: Path):
        examples = load_examples(path, task)
        rows = [np.asarray(tok.encode(e.texts)[:limit], np.int64) for e in examples]
        labels = np.array([e.label for e in examples], np.float32 if task.kind == "regression" else np.int64)
        return rows, labels

    train, train_labels = encode(train_file)
    held = len([ln for ln in holdout_file.read_text(encoding="utf-8").splitlines() if ln.strip()]) - task.has_header
    holdout, holdout_labels = encode(holdout_file) if held > 0 else ([], train_labels[:0])
    dev, dev_labels, dev_split = [], [], []
    for k, path in enumerate(dev_files.values()):
        rows, labels = encode(path)
        dev, dev_labels, dev_split = dev + rows, dev_labels + [labels], dev_split + [k] * len(rows)
    dev_labels = np.concatenate(dev_labels)
    lengths = np.array([len(r) for r in train])
    plan = plan_batches(lengths, s.batch_size, PLAN_EPOCHS, s.seed)  # the device's order, epoch after epoch
    dev_plan = plan_batches(np.array([len(r) for r in dev]), s.batch_size, 1, seed=0)  # as JointModel.predict

    def flat(parts):
        return np.concatenate(parts), np.cumsum([0] + [len(p) for p in parts])

    holdout_plan = plan_batches(np.array([len(r) for r in holdout]), s.batch_size, 1, seed=0) if holdout else []
    arrays = {}
    for name, parts in (("train", train), ("dev", dev), ("plan", plan), ("dev_plan", dev_plan),
                        ("holdout", holdout), ("holdout_plan", holdout_plan)):
        values, offsets = flat(parts) if len(parts) else (np.zeros(0, np.int64), np.zeros(1, np.int64))
        arrays[f"{name}_{'idx' if 'plan' in name else 'ids'}"] = values
        arrays[f"{name}_offsets"] = offsets
    np.savez(work / "data.npz", train_labels=train_labels, dev_labels=dev_labels, holdout_labels=holdout_labels,
             pad_id=manifest.pad_token_id,
             dev_split=np.array(dev_split, np.int64), **arrays)
    return {"task": {"name": task.name, "kind": task.kind, "num_labels": task.num_labels, "out_dim": task.out_dim,
                     "metric": task.metric, "dev_splits": list(dev_files)},
            "train_file": str(train_file), "dev_file": str(next(iter(dev_files.values()))),
            "dev_files": {k: str(v) for k, v in dev_files.items()}, "data": str(work / "data.npz"),
            "holdout_file": str(holdout_file) if holdout else None, "holdout_rows": len(holdout),
            "train_rows": len(train), "dev_rows": len(dev), "manifest": manifest, "header": task.has_header,
            "mean_train_tokens": float(lengths.mean()),
            "mean_padded_tokens": float(np.mean([lengths[b].max() for b in plan[: max(1, len(plan) // PLAN_EPOCHS)]]))}
