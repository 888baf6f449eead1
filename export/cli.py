"""`export-backbone`: turn a frozen decoder into a tapped, self-quantizing ONNX engine.

    export-backbone MODEL --out DIR [options]   export (MODEL: opt-125m .. opt-6.7b, an HF id or a checkpoint folder)
    export-backbone verify DIR                  re-check an engine against the torch model it came from
    export-backbone trt DIR                     build its TensorRT plan on the device (no torch; docs/gpu.md)

Exit status: 0 ok, 1 verification failed, 2 bad input (one line on stderr says what to do), 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mobillm.common.errors import INTERRUPTED, MobillmError, run_command
from mobillm.common.options import HelpFormatter, Parser, add_options, all_but, from_args, option_fields

from .options import ExportOptions, parse_set_args

PROG = "export-backbone"


class Interrupted(MobillmError):
    """Ctrl-C during an export (exit 130): the temp folder is gone, `out` untouched."""

    exit_code = INTERRUPTED


def _help(name: str) -> str:
    return next(meta["help"] for f, meta, _ in option_fields(ExportOptions) if f.name == name)


def _add(parser, *names: str) -> None:
    """Flags for the named ExportOptions fields, in field order."""
    add_options(parser, ExportOptions, skip=all_but(ExportOptions, *names))


def build_parser() -> argparse.ArgumentParser:
    """The export parser: every flag but --quiet comes from an ExportOptions field (name, default, help).

    MODEL is positional and --set repeats, which `add_options` does not express; they take their
    help from their fields all the same. Groups keep the flags in the order of the docs."""
    p = Parser(prog=PROG, description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("model", help=_help("model"))
    _add(p, "out", "force", "random_init", "seed")
    p.add_argument("--set", dest="overrides", action="append", metavar="KEY=VALUE", default=[],
                   help=_help("overrides"))
    _add(p, "tokenizer")
    _add(p.add_mutually_exclusive_group(), "blocks", "taps")
    _add(p, "quant", "tap_formats", "block_size", "dtype", "weights", "widen", "int8_kernel", "smooth_alpha", "exporter", "quant_op",
         "tap_rows", "tap_norm", "calibration", "calibration_cols", "calibration_rows", "summary_row", "trt", "verify")
    _add(p, "ort_fusions")
    p.add_argument("--quiet", action="store_true", help="no stage messages")
    return p


def build_verify_parser() -> argparse.ArgumentParser:
    """The parser of `export-backbone verify DIR`."""
    p = Parser(prog=f"{PROG} verify", description="Run an engine in ONNX Runtime on a few sentences and compare "
                                                   "every decoded tap with the torch model recorded in its manifest.")
    p.add_argument("engine", type=Path, help="engine folder written by export-backbone")
    return p


def build_trt_parser() -> argparse.ArgumentParser:
    """The parser of `export-backbone trt DIR`."""
    p = Parser(prog=f"{PROG} trt", description="Build the TensorRT plan (ENGINE/backbone.plan) of an existing "
                                                "engine on the machine that will run it, and record it in the "
                                                "manifest; needs TensorRT and an NVIDIA GPU, not torch.")
    p.add_argument("engine", type=Path, help="engine folder written by export-backbone (weights fp32 or fp16)")
    return p


def main(argv=None) -> int:
    """Entry point of `export-backbone`; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["verify"]:
            args = build_verify_parser().parse_args(argv[1:])
            return run_command(PROG, lambda: _verify(args.engine))
        if argv[:1] == ["trt"]:
            args = build_trt_parser().parse_args(argv[1:])
            return run_command(PROG, lambda: _trt(args.engine))
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2), already printed
        return exc.code if isinstance(exc.code, int) else 2
    return run_command(PROG, lambda: _export(args))


def _export(args) -> int:
    from .pipeline import run_export, summary
    from .verify import VerificationFailed

    options = from_args(ExportOptions, args, overrides=parse_set_args(args.overrides), progress=not args.quiet)
    try:
        manifest = run_export(options)
    except VerificationFailed as exc:
        if args.quiet:  # otherwise the stages already printed the table
            print(exc.report.table(), file=sys.stderr)
        raise
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted; nothing was written to {options.out}") from None
    print(summary(options.out, manifest))
    return 0


def _verify(engine: Path) -> int:
    from .verify import verify_engine

    report = verify_engine(engine)
    print(report.table())
    return 0 if report.ok else 1


def _trt(engine: Path) -> int:
    from .trt import add_plan

    record = add_plan(engine)
    print(f"{engine / record['plan']}: TensorRT {record['tensorrt']}, fp16, profile {record['profile']}")
    return 0
