"""`edge-run`: fine-tune from the device with forward passes only, then predict locally.

  edge-run train   --engine DIR --data FILE --task sst2 --server ws://HOST:8765
  edge-run predict --engine DIR --side SIDE.onnx "a gripping, funny film"
  edge-run eval    --engine DIR --side SIDE.onnx --data dev.tsv --task sst2
  edge-run bundle  --engine DIR --side SIDE.onnx --out BUNDLE   one portable ONNX graph + tokenizer.json
  edge-run serve   --bundle BUNDLE (or --engine DIR --side SIDE.onnx)   local HTTP JSON predictions
  edge-run train   --profile paper ...   the paper's batch 16, max-len 256, 20 epochs (flags given win)

Exit status: 0 done, 2 bad input (flags, engine, data, a refused or unreachable server), 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np

from mobillm.common.errors import BadInput, MobillmError, run_command
from mobillm.common.options import HelpFormatter, Parser, add_options, all_but, from_args, read_token_file
from mobillm.common.profiles import add_profile_flag, parse_with_profile
from mobillm.common.tasks import Task

from .backbone import EngineOptions
from .data import DataError, DataOptions, Example, load_examples
from .batches import fixed_formats
from .serve import ServeOptions
from .stream import StreamClient, TrainOptions, stats_dict

# predict and eval batch rows with training's two fields (and their defaults); the rest are train-only.
BATCH_FIELDS = ("max_len", "batch_size")


def _subcommand(sub, name: str, help: str, train: bool, defaults: dict) -> argparse.ArgumentParser:
    """A subcommand with the engine, data, batching and --profile flags every subcommand shares."""
    p = sub.add_parser(name, help=help, description=help, formatter_class=HelpFormatter)
    add_options(p.add_argument_group("engine"), EngineOptions)
    # predict/eval: the task defaults to the one the side network was trained for (else sst2).
    add_options(p.add_argument_group("data"), DataOptions, defaults=None if train else {"task": None})
    if not train:
        task_flag = next(a for a in p._actions if a.dest == "task")
        task_flag.help += " (default: the task the side network was trained for, else sst2)"
    group = p.add_argument_group("training" if train else "batching")
    add_options(group, TrainOptions, skip=() if train else all_but(TrainOptions, *BATCH_FIELDS), defaults=defaults)
    add_profile_flag(group)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    return p


def build_parser(defaults: dict | None = None) -> argparse.ArgumentParser:
    """The `edge-run` parser; `defaults` (a --profile's device values) replace the training flags' defaults."""
    parser = Parser(prog="edge-run", description=__doc__, formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    defaults = defaults or {}

    t = _subcommand(sub, "train", "stream quantized activations of local data to a trainer server", train=True,
                    defaults=defaults)
    t.add_argument("--data", required=True, type=Path,
                   help="training data: .tsv (GLUE), .csv, .jsonl, .parquet (needs pyarrow) or datasets folder")
    t.add_argument("--token-file", type=Path, default=None,
                   help="file holding the server's bearer token (default: none sent)")
    t.add_argument("--stats-out", type=Path, default=None,
                   help="write run statistics as JSON here (default: not written)")
    t.set_defaults(handler=cmd_train)

    p = _subcommand(sub, "predict", "predict with the joint model (backbone + side network), locally", train=False,
                    defaults=defaults)
    p.add_argument("--side", required=True, type=Path, help="side network ONNX returned by training")
    p.add_argument("--data", type=Path, default=None, help="data file (default: the texts given)")
    p.add_argument("texts", nargs="*", help="texts to classify (or use --data)")
    p.add_argument("--out", type=Path, default=None,
                   help="write predictions as JSONL here (default: stdout, a table on a terminal, else JSONL)")
    p.add_argument("--labels", default=None, metavar="NAME,NAME",
                   help="class names in class-id order (default: the task preset's)")
    p.set_defaults(handler=cmd_predict)

    e = _subcommand(sub, "eval", "score the joint model on labelled data with the task's metric", train=False,
                    defaults=defaults)
    e.add_argument("--side", required=True, type=Path, help="side network ONNX returned by training")
    e.add_argument("--data", required=True, type=Path, help="labelled data file")
    e.add_argument("--labels", default=None, metavar="NAME,NAME",
                   help="class names in class-id order (default: the task preset's)")
    e.set_defaults(handler=cmd_eval)

    b = sub.add_parser("bundle", help="write the engine + side network as one portable ONNX graph (+ tokenizer)",
                       description="One ONNX graph input_ids, attention_mask -> logits, probabilities that any "
                                   "ONNX Runtime binding runs (docs/bundle.md). Needs the onnx package here; the "
                                   "bundle does not.", formatter_class=HelpFormatter)
    b.add_argument("--engine", required=True, type=Path, metavar="DIR", help="engine folder made by export-backbone")
    b.add_argument("--side", required=True, type=Path, help="side network ONNX returned by training")
    b.add_argument("--out", required=True, type=Path, metavar="DIR", help="bundle folder to write (replaced)")
    _model_flags(b)
    b.set_defaults(handler=cmd_bundle)

    v = sub.add_parser("serve", help="serve predictions over local HTTP JSON (POST /predict, GET /health)",
                       description=serve_doc(), formatter_class=HelpFormatter)
    v.add_argument("--bundle", type=Path, default=None, metavar="DIR", help="bundle folder from edge-run bundle")
    v.add_argument("--engine", type=Path, default=None, metavar="DIR", help="engine folder (with --side, instead "
                                                                             "of --bundle)")
    v.add_argument("--side", type=Path, default=None, help="side network ONNX (with --engine)")
    v.add_argument("--threads", type=int, default=None, help="ORT intra-op threads (default: all cores)")
    _model_flags(v)
    add_options(v.add_argument_group("service"), ServeOptions)
    v.set_defaults(handler=cmd_serve)
    return parser


def serve_doc() -> str:
    from . import serve

    return serve.__doc__.split("\n\n")[0]


def _model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", default=None, help="task preset (default: the one the side network was trained for)")
    p.add_argument("--labels", default=None, metavar="NAME,NAME",
                   help="class names in class-id order (default: the task preset's)")
    p.add_argument("--max-len", type=int, default=TrainOptions.max_len, help="longest token row; longer is cut")


def write_atomic(path: Path, text: str) -> None:
    """Write `text` via a temporary file and a rename, so no half-written file is left behind."""
    tmp = path.with_suffix(path.suffix + ".part")
    try:
        tmp.write_text(text)
        tmp.replace(path)
    except OSError as exc:
        raise BadInput(f"cannot write {path} ({exc.strerror or exc})") from None


def cmd_train(args) -> int:
    data = from_args(DataOptions, args)
    task = data.resolve_task()
    opts = from_args(TrainOptions, args, progress=not args.quiet,
                     token=read_token_file(args.token_file) if args.token_file else None)
    opts.check()  # a bad --server, --device-id or --run before the engine and data are read
    bb = from_args(EngineOptions, args).open()
    fixed_formats(opts.bits, len(bb.manifest.taps))  # refuse a bad --bits before any data is read
    examples = load_examples(args.data, task, limit=data.limit)
    trainer = StreamClient(bb, examples, task, opts)
    print(f"edge-run: {len(examples)} rows x {opts.epochs} epoch(s), {len(trainer.batches)} batches -> {opts.server} "
          f"({trainer.mode} mode, {bb.manifest.bytes_per_token()} B/token on the wire)", file=sys.stderr)
    try:
        stats = trainer.run()
    except MobillmError:  # the run ended without a side network: the statistics say how far it got, and why
        if args.stats_out:
            write_atomic(args.stats_out, json.dumps(stats_dict(trainer.stats), indent=2))
        raise
    side = trainer.save_model(Path(opts.side_out) if opts.side_out else bb.folder / f"side_{task.name}.onnx")
    if args.stats_out:
        write_atomic(args.stats_out, json.dumps(stats_dict(stats), indent=2))
    print(f"edge-run: sent {stats.samples_sent} samples, {stats.bytes_sent / 1e6:.2f} MB in {stats.wall_s:.1f}s "
          f"(forward {stats.forward_s:.1f}s, peak RSS {stats.peak_rss_mb:.0f} MiB, {stats.reconnects} reconnects); "
          f"side network saved to {side}")
    return 0


def _examples_for_predict(args, data: DataOptions, task: Task) -> list[Example]:
    if args.data:
        return load_examples(args.data, task, limit=data.limit, require_labels=args.command == "eval")
    if args.command == "predict" and args.texts:
        return [Example((t,), None) for t in args.texts]
    raise DataError("give texts to classify or --data FILE")


def resolve_task(task: str | None, side: Path, meta: dict, data: DataOptions | None = None) -> Task:
    """--task (or, when not given, the task the side network was trained for, else sst2) with the data flags;
    exit 2 naming both when the side network was trained for another task."""
    from .predict import check_side_task

    trained = meta.get("task")
    name = task or (trained if trained and trained != "custom" else "sst2")
    data = replace(data, task=name) if data is not None else DataOptions(task=name)
    resolved = data.resolve_task()
    check_side_task(side, meta, resolved)
    return resolved


def resolve_labels(flag: str | None, task: Task) -> tuple[str, ...]:
    """Class names: --labels, else the task's (regression: none)."""
    if task.kind == "regression":
        return ()
    if not flag:
        return task.class_names
    names = tuple(n.strip() for n in flag.split(","))
    if len(names) != task.num_labels or not all(names):
        raise BadInput(f"--labels names {len(names)} classes; task {task.name} has {task.num_labels}")
    return names


def _joint_model(args):
    """The engine's backbone and the --side network, as the engine and data flags ask."""
    from .predict import JointModel

    data = from_args(DataOptions, args)
    model = JointModel(from_args(EngineOptions, args).open(), args.side)
    task = resolve_task(args.task, args.side, model.meta, data)
    return model, task, _examples_for_predict(args, data, task), from_args(TrainOptions, args)


def cmd_predict(args) -> int:
    from .predict import readable

    model, task, examples, batching = _joint_model(args)
    labels = resolve_labels(args.labels, task)
    outputs = model.predict(examples, batching.max_len, batching.batch_size, progress=not args.quiet)
    records = readable([" | ".join(ex.texts) for ex in examples], outputs, task, labels)
    lines = [json.dumps(r) for r in records]
    if args.out:
        write_atomic(args.out, "\n".join(lines) + "\n")
        print(f"edge-run: wrote {len(lines)} predictions to {args.out}")
    elif sys.stdout.isatty():
        print(table(records, task))
    else:
        print("\n".join(lines))
    return 0


def table(records: list[dict], task: Task) -> str:
    """Predictions as a plain table for a person at a terminal."""
    head: tuple[str, ...]
    cells: list[tuple[str, ...]]
    if task.kind == "regression":
        head, cells = ("value", "text"), [(f"{r['value']:.4f}", r["text"]) for r in records]
    else:
        head, cells = ("label", "score", "text"), [(r["label"], f"{r['score']:.3f}", r["text"]) for r in records]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(head[:-1])]
    rows = [head] + cells
    return "\n".join("  ".join([c.ljust(w) for c, w in zip(row[:-1], widths)] + [row[-1]]) for row in rows)


def cmd_eval(args) -> int:
    from mobillm.common.tasks import confusion, score

    model, task, examples, batching = _joint_model(args)
    outputs = model.predict(examples, batching.max_len, batching.batch_size, progress=not args.quiet)
    gold = np.array([e.label for e in examples])
    result = score(task, outputs, gold)
    if task.kind == "class":
        task = replace(task, labels=resolve_labels(args.labels, task))
        result.update(confusion(task, outputs, gold))
    print(json.dumps({"task": task.name, "rows": len(examples), **result}))
    return 0


def cmd_bundle(args) -> int:
    from .bundle import build_bundle
    from .predict import read_side_meta

    task = resolve_task(args.task, args.side, read_side_meta(args.side))
    info = build_bundle(args.engine, args.side, args.out, task, resolve_labels(args.labels, task), args.max_len)
    print(f"edge-run: wrote bundle {info.folder} ({info.size_bytes / 1e6:.1f} MB: {', '.join(info.meta['files'])}, "
          f"bundle.json) for {info.meta['model']} / {task.name}")
    return 0


def cmd_serve(args) -> int:
    from .serve import PredictionService

    opts = from_args(ServeOptions, args)
    if bool(args.bundle) == bool(args.engine or args.side) or (args.engine is None) != (args.side is None):
        raise BadInput("give --bundle DIR, or --engine DIR and --side SIDE.onnx")
    if args.bundle:
        from .bundle import BundleModel

        model = BundleModel(args.bundle, threads=args.threads)
        meta = {"task": model.meta["task"]}
        task = resolve_task(args.task, args.bundle / "bundle.json", meta)
        labels = resolve_labels(args.labels, task) if args.labels else tuple(model.meta["labels"])
        max_len = min(args.max_len, model.max_length)
        describe = {"model": model.meta["model"], "bundle": str(args.bundle), "engine_sha256": model.meta["engine_sha256"]}
        tokenize, logits = (lambda texts: model.tokenize(texts, max_len)), model.logits
    else:
        from .backbone import Backbone
        from .predict import JointModel

        joint = JointModel(Backbone(args.engine, threads=args.threads), args.side)
        task = resolve_task(args.task, args.side, joint.meta)
        labels = resolve_labels(args.labels, task)
        describe = {"model": joint.bb.manifest.model_id, "engine": str(args.engine)}
        tokenize, logits = (lambda texts: joint.bb.tokenize(texts, args.max_len)[0]), joint.logits
    service = PredictionService(tokenize, logits, task, labels, describe, opts)
    logging.getLogger("mobillm.serve").setLevel(logging.INFO)
    port = service.start()
    print(f"edge-run: serving {describe['model']} / {task.name} on http://{opts.host}:{port} "
          f"(POST /predict, GET /health); Ctrl-C stops", file=sys.stderr, flush=True)
    try:
        threading.Event().wait()
    finally:
        service.stop()
    return 0


def main(argv=None) -> int:
    args = parse_with_profile(build_parser, argv, "device")
    logging.basicConfig(level=logging.WARNING, format="edge-run: %(message)s")
    return run_command("edge-run", lambda: args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
