"""`edge-run`: fine-tune from the device with forward passes only, then predict locally.

  edge-run train   --engine DIR --data FILE --task sst2 --server ws://HOST:8765
  edge-run predict --engine DIR --side SIDE.onnx "a gripping, funny film"
  edge-run eval    --engine DIR --side SIDE.onnx --data dev.tsv --task sst2
  edge-run train   --profile paper ...   the paper's batch 16, max-len 256, 20 epochs (flags given win)

Exit status: 0 done, 2 bad input (flags, engine, data, a refused or unreachable server), 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from mobillm.common.errors import BadInput, MobillmError, run_command
from mobillm.common.options import HelpFormatter, Parser, add_options, all_but, from_args, read_token_file
from mobillm.common.profiles import add_profile_flag, parse_with_profile
from mobillm.common.tasks import Task

from .backbone import EngineOptions
from .data import DataError, DataOptions, Example, load_examples
from .batches import fixed_formats
from .stream import StreamClient, TrainOptions, stats_dict

# predict and eval batch rows with training's two fields (and their defaults); the rest are train-only.
BATCH_FIELDS = ("max_len", "batch_size")


def _subcommand(sub, name: str, help: str, train: bool, defaults: dict) -> argparse.ArgumentParser:
    """A subcommand with the engine, data, batching and --profile flags every subcommand shares."""
    p = sub.add_parser(name, help=help, description=help, formatter_class=HelpFormatter)
    add_options(p.add_argument_group("engine"), EngineOptions)
    add_options(p.add_argument_group("data"), DataOptions)
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
                   help="training data: .tsv (GLUE), .csv, .jsonl or datasets folder")
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
    p.add_argument("--out", type=Path, default=None, help="write predictions as JSONL here (default: stdout)")
    p.set_defaults(handler=cmd_predict)

    e = _subcommand(sub, "eval", "score the joint model on labelled data with the task's metric", train=False,
                    defaults=defaults)
    e.add_argument("--side", required=True, type=Path, help="side network ONNX returned by training")
    e.add_argument("--data", required=True, type=Path, help="labelled data file")
    e.set_defaults(handler=cmd_eval)
    return parser


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
          f"({trainer.opts.mode} mode, {bb.manifest.bytes_per_token()} B/token on the wire)", file=sys.stderr)
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


def _joint_model(args):
    """The engine's backbone and the --side network, as the engine and data flags ask."""
    from .predict import JointModel

    data = from_args(DataOptions, args)
    task = data.resolve_task()
    model = JointModel(from_args(EngineOptions, args).open(), args.side)
    return model, task, _examples_for_predict(args, data, task), from_args(TrainOptions, args)


def cmd_predict(args) -> int:
    model, task, examples, batching = _joint_model(args)
    outputs = model.predict(examples, batching.max_len, batching.batch_size, progress=not args.quiet)
    lines = []
    for ex, out in zip(examples, outputs):
        pred = float(out[0]) if task.kind == "regression" else int(out.argmax())
        lines.append(json.dumps({"text": " | ".join(ex.texts), "prediction": pred, "logits": [float(v) for v in out]}))
    if args.out:
        write_atomic(args.out, "\n".join(lines) + "\n")
        print(f"edge-run: wrote {len(lines)} predictions to {args.out}")
    else:
        print("\n".join(lines))
    return 0


def cmd_eval(args) -> int:
    model, task, examples, batching = _joint_model(args)
    result = model.evaluate(examples, task, batching.max_len, batching.batch_size, progress=not args.quiet)
    print(json.dumps({"task": task.name, "rows": len(examples), **result}))
    return 0


def main(argv=None) -> int:
    args = parse_with_profile(build_parser, argv, "device")
    logging.basicConfig(level=logging.WARNING, format="edge-run: %(message)s")
    return run_command("edge-run", lambda: args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
