"""`edge-run`: fine-tune from the device with forward passes only, then predict locally.

  edge-run train   --engine DIR --data FILE --task sst2 --server ws://HOST:8765
  edge-run predict --engine DIR --side SIDE.onnx "a gripping, funny film"
  edge-run eval    --engine DIR --side SIDE.onnx --data dev.tsv --task sst2
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from mobillm.common.tasks import Task, get_task
from mobillm.common.manifest import ManifestError
from mobillm.kernels.codec import NonFiniteActivation

from .backbone import PROVIDERS, Backbone
from .data import DataError, Example, load_examples
from .stream import ServerError, StreamClient, TrainOptions, stats_dict


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engine", required=True, type=Path, help="engine folder made by export-backbone")
    p.add_argument("--provider", default="cpu", choices=sorted(PROVIDERS),
                   help="ONNX Runtime execution provider (falls back to cpu with a message if missing)")
    p.add_argument("--threads", type=int, default=None, help="ORT intra-op threads (default: all cores)")
    p.add_argument("--prepack", action="store_true",
                   help="let ORT keep pre-packed copies of the weights: up to ~10%% faster on some CPUs, "
                        "~30%% more peak memory (off by default: memory is the device's scarcest resource)")
    p.add_argument("--max-len", type=int, default=128, help="truncate rows to this many tokens (default 128)")
    p.add_argument("--batch-size", type=int, default=16, help="rows per forward pass (default 16)")
    p.add_argument("--task", default="sst2", help="task preset: sst2, cola, mrpc, stsb, rte, qnli (default sst2)")
    p.add_argument("--text-cols", default=None, help="comma-separated text columns, overriding the preset")
    p.add_argument("--label-col", default=None, help="label column, overriding the preset")
    p.add_argument("--num-labels", type=int, default=None, help="number of classes for a custom task")
    p.add_argument("--regression", action="store_true", help="custom task has a real-valued label")
    p.add_argument("--limit", type=int, default=None, help="use only the first N rows of the data")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="stream quantized activations of local data to a trainer server")
    _common(t)
    t.add_argument("--data", required=True, type=Path, help="training data: .tsv (GLUE), .csv, .jsonl or datasets folder")
    t.add_argument("--server", default="ws://127.0.0.1:8765", help="trainer server URL, ws:// or wss://")
    t.add_argument("--epochs", type=int, default=1, help="passes over the data (default 1)")
    t.add_argument("--send", default="pooled", choices=["pooled", "tokens"],
                   help="pooled: only the row the head reads (exact for last-token heads); tokens: every real token")
    t.add_argument("--bits", default="engine",
                   help="engine (formats in the graph), a format (nf4, int4, fp8, int8, fp16) or a comma list "
                        "per tap, or auto (adapt to measured uplink; best with an engine exported with --quant fp16)")
    t.add_argument("--latency-target", type=float, default=0.5, help="auto bits: seconds one batch may take to send")
    t.add_argument("--seed", type=int, default=0, help="data order seed (resuming needs the same seed)")
    t.add_argument("--device-id", default="device-0", help="stable id of this device (used to resume)")
    t.add_argument("--run", default=None, help="run name on the server (default: chosen by the server)")
    t.add_argument("--token-file", type=Path, default=None, help="file holding the server's bearer token")
    t.add_argument("--ca", default=None, help="CA certificate to verify a wss:// server (verification is never off)")
    t.add_argument("--side-out", type=Path, default=None,
                   help="where to save the returned side network (default ENGINE/side_TASK.onnx)")
    t.add_argument("--stats-out", type=Path, default=None, help="write run statistics as JSON here")

    for name, text in (("predict", "predict with the joint model (backbone + side network), locally"),
                       ("eval", "score the joint model on labelled data with the task's metric")):
        p = sub.add_parser(name, help=text)
        _common(p)
        p.add_argument("--side", required=True, type=Path, help="side network ONNX returned by training")
        p.add_argument("--data", type=Path, default=None, help="data file" + (" (required)" if name == "eval" else ""))
        if name == "predict":
            p.add_argument("texts", nargs="*", help="texts to classify (or use --data)")
            p.add_argument("--out", type=Path, default=None, help="write predictions as JSONL here")
    return parser


def resolve_task(args) -> Task:
    base = get_task(args.task) if not (args.text_cols and args.label_col and args.num_labels) else None
    if base is None:
        return Task("custom", "regression" if args.regression else "class", args.num_labels or 1,
                    tuple(args.text_cols.split(",")), args.label_col,
                    "pearson" if args.regression else "accuracy")
    if args.text_cols or args.label_col:
        from dataclasses import replace

        return replace(base, text_cols=tuple(args.text_cols.split(",")) if args.text_cols else base.text_cols,
                       label_col=args.label_col or base.label_col)
    return base


def _backbone(args) -> Backbone:
    """The engine's ORT session as `_common`'s options ask (--engine, --provider, --threads, --prepack)."""
    return Backbone(args.engine, args.provider, args.threads, prepack=args.prepack)


def cmd_train(args) -> int:
    task = resolve_task(args)
    bb = _backbone(args)
    examples = load_examples(args.data, task, limit=args.limit)
    token = args.token_file.read_text().strip() if args.token_file else None
    opts = TrainOptions(server=args.server, epochs=args.epochs, batch_size=args.batch_size, max_len=args.max_len,
                        mode=args.send, bits=args.bits, latency_target_s=args.latency_target, seed=args.seed,
                        device_id=args.device_id, run=args.run, token=token, ca=args.ca, progress=not args.quiet)
    trainer = StreamClient(bb, examples, task, opts)
    print(f"edge-run: {len(examples)} rows x {args.epochs} epoch(s), {len(trainer.batches)} batches -> {args.server} "
          f"({args.send} mode, {bb.manifest.bytes_per_token()} B/token on the wire)", file=sys.stderr)
    stats = trainer.run()
    side = trainer.save_model(args.side_out or args.engine / f"side_{task.name}.onnx")
    summary = stats_dict(stats)
    if args.stats_out:
        args.stats_out.write_text(json.dumps(summary, indent=2))
    print(f"edge-run: sent {stats.samples_sent} samples, {stats.bytes_sent / 1e6:.2f} MB in {stats.wall_s:.1f}s "
          f"(forward {stats.forward_s:.1f}s, peak RSS {stats.peak_rss_mb:.0f} MiB, {stats.reconnects} reconnects); "
          f"side network saved to {side}")
    return 0


def _examples_for_predict(args, task: Task) -> list[Example]:
    if args.data:
        return load_examples(args.data, task, limit=args.limit, require_labels=args.command == "eval")
    if args.command == "predict" and args.texts:
        return [Example((t,), None) for t in args.texts]
    raise DataError("give texts to classify or --data FILE")


def cmd_predict(args) -> int:
    from .predict import JointModel

    task = resolve_task(args)
    model = JointModel(_backbone(args), args.side)
    examples = _examples_for_predict(args, task)
    outputs = model.predict(examples, args.max_len, args.batch_size, progress=not args.quiet)
    lines = []
    for ex, out in zip(examples, outputs):
        pred = float(out[0]) if task.kind == "regression" else int(out.argmax())
        lines.append(json.dumps({"text": " | ".join(ex.texts), "prediction": pred, "logits": [float(v) for v in out]}))
    if getattr(args, "out", None):
        tmp = args.out.with_suffix(args.out.suffix + ".part")
        tmp.write_text("\n".join(lines) + "\n")
        tmp.replace(args.out)
        print(f"edge-run: wrote {len(lines)} predictions to {args.out}")
    else:
        print("\n".join(lines))
    return 0


def cmd_eval(args) -> int:
    from .predict import JointModel

    if not args.data:
        raise DataError("eval needs --data FILE with labels")
    task = resolve_task(args)
    model = JointModel(_backbone(args), args.side)
    examples = _examples_for_predict(args, task)
    result = model.evaluate(examples, task, args.max_len, args.batch_size, progress=not args.quiet)
    print(json.dumps({"task": task.name, "rows": len(examples), **result}))
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="edge-run: %(message)s")
    try:
        return {"train": cmd_train, "predict": cmd_predict, "eval": cmd_eval}[args.command](args)
    except (DataError, ManifestError, ServerError, NonFiniteActivation, ValueError, OSError) as exc:
        print(f"edge-run: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("edge-run: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
