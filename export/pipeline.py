"""`export_engine`: a decoder checkpoint -> an engine folder the device runs without torch.

    ENGINE/backbone.onnx (+ backbone.onnx.data over 2 GB)   input_ids, attention_mask -> tap{i}_codes, tap{i}_scales
    ENGINE/tokenizer/                                        tokenizer.json (+ the source files)
    ENGINE/manifest.json                                     everything downstream needs, with sha256 of each file

Stages, in order: check every option and what it names (`plan`: cheap, before any model is built)
-> build the torch model (export/source.py) -> trace `TappedDecoder` to ONNX and splice the codec
of each tap into the graph (export/graph.py, `kernels/onnx_codec`) -> store the weights in their
format (export/weights.py) -> tokenizer -> manifest -> optional verify (export/verify.py) ->
rename the temp folder into place. A failed or interrupted export leaves nothing at `out`.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from mobillm.common.manifest import Manifest, TapSpec
from mobillm.common.tokenize import EngineTokenizer
from mobillm.kernels import onnx_codec

from . import calibrate as calibration
from . import families, optimize, weights
from . import trt as trt_plan
from .graph import (GRAPH_NAME, ROW_INPUT, SWITCH_INPUT, choose_exporter, codec_node_names, io_specs,
                    move_weights_out, tap_specs, tap_switch, trace_to_onnx)
from .options import ExportError, ExportOptions, comma_list
from .source import (TOKENIZER_DIR, Source, apply_overrides, build_model, install_tokenizer, load_config,
                     load_tokenizer, prepare_source, release_weights, resolve_source,
                     token_rules)
from .verify import VerificationFailed, verify_engine


def export_engine(model: str, out: Path | str, **options) -> Manifest:
    """Export `model` to the engine folder `out` and return its manifest; the keywords are the
    other fields of `ExportOptions` (quant, blocks, taps, weights, verify, progress, ...)."""
    return run_export(ExportOptions(model=model, out=out, **options))


def run_export(options: ExportOptions) -> Manifest:
    """Export as `options` say. Raises ExportError on bad input (before any model is built where it
    can), VerificationFailed when `options.verify` finds the engine wrong; either way, and on any
    other failure, nothing is left at `options.out` (an old engine there stays)."""
    plan = make_plan(options)
    opts, out = plan.options, plan.options.out
    step = _Stages(opts.progress, 7 + (opts.quant_op == "custom") + bool(opts.trt) + bool(opts.verify))
    step(f"{opts.model} ({plan.source.kind}): {sum(opts.blocks)} layers, taps "
         f"{comma_list(opts.tap_layers)}, quant {opts.quant}, compute {opts.dtype}, weights {opts.weights}")
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent))
    try:
        manifest = _export_into(tmp, plan, step)
        if opts.verify:
            step("verifying the engine against torch")
            report = verify_engine(tmp)
            if opts.progress:
                print(report.table(), file=sys.stderr)
            if not report.ok:
                raise VerificationFailed(report, out)
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


@dataclass
class Plan:
    """An export checked end to end before any work: the options resolved against the model they name."""

    options: ExportOptions  # resolved: blocks, one format per tap, weights and tap norm explicit; typed --set
    source: Source
    config: object  # the transformers config, overrides applied
    family: families.Family
    tokenizer: object  # the transformers tokenizer
    tokenizer_from: Path | str  # the folder (or hub id) its files come from


def make_plan(options: ExportOptions) -> Plan:
    """Check everything that bad input can break, cheapest first; ExportError says what to change."""
    source = resolve_source(options.model, options.random_init)
    if options.trt:
        trt_plan.check(options)
    check_out(options.out, options.force)
    prepare_source(source, options.progress)
    config = load_config(source)
    typed = apply_overrides(config, options.overrides)
    family = families.family_for(config.model_type)
    opts = dataclasses.replace(options, overrides=typed).resolved(family, family.num_layers(config))
    if opts.tap_norm == "channel" or (opts.weights in weights.QUANTIZED and opts.smooth_alpha > 0):
        # a bad --calibration fails here, before any model is built
        calibration.calibration_texts(opts.calibration, opts.calibration_cols, opts.calibration_rows)
    if opts.weights == "gguf" and source.gguf is None:
        raise ExportError(f"--weights gguf keeps a GGUF's own quantized tensors; {options.model} is not a GGUF "
                          f"(give a .gguf file or a GGUF short name such as gemma-3-270m)")
    tok, tok_from = load_tokenizer(source, opts.tokenizer)
    if len(tok) > config.vocab_size:
        raise ExportError(f"the tokenizer has {len(tok)} tokens but the model's vocab_size is {config.vocab_size}; "
                          f"use the model's own tokenizer")
    return Plan(opts, source, config, family, tok, tok_from)


def _export_into(folder: Path, plan: Plan, step: _Stages) -> Manifest:
    opts, source, config, family = plan.options, plan.source, plan.config, plan.family
    step(f"building {family.name} model, {family.num_layers(config)} layers"
         + (f", random init seed {opts.seed}" if source.kind == "random-init" else ""))
    torch_model = build_model(source, config, opts.seed, opts.dtype)
    smoothing = None
    if opts.weights in weights.QUANTIZED and opts.smooth_alpha > 0:
        from . import smooth

        texts, source_record = calibration.calibration_texts(opts.calibration, opts.calibration_cols,
                                                             opts.calibration_rows)
        smoothing = smooth.migrate(torch_model, family, plan.tokenizer, opts.smooth_alpha, texts, source_record,
                                   opts.progress)
    exporter = choose_exporter(torch_model, opts.exporter)

    step(f"copying tokenizer from {plan.tokenizer_from}")
    install_tokenizer(plan.tokenizer, plan.tokenizer_from, folder / TOKENIZER_DIR)
    rules = token_rules(family, plan.tokenizer, config)
    stats, conditioning = None, None
    if opts.tap_norm == "channel":
        import torch

        from .tapped import TappedDecoder, TapStats

        texts, record = calibration.calibration_texts(opts.calibration, opts.calibration_cols, opts.calibration_rows)
        step(f"calibrating channel conditioning on {len(texts)} rows ({record['calibration']})")
        tok = EngineTokenizer(folder / TOKENIZER_DIR, rules)
        rows = [tok.encode((t,))[:CALIBRATION_MAX_LEN] for t in texts]
        probe = TappedDecoder(torch_model, family, opts.tap_layers, torch.float32, opts.tap_norm, True).eval()
        arrays = calibration.measure_stats(probe, rows, _pad_id(plan.tokenizer, config))
        del probe
        stats = TapStats(arrays)
        conditioning = {**record, "rows": len(rows), "file": calibration.STATS_NAME,
                        "stats_sha256": calibration.save_stats(arrays, folder)}

    step(f"tracing to ONNX (torch.onnx.export, {exporter})")
    raw = folder / "_raw"
    raw.mkdir()
    widths = trace_to_onnx(torch_model, family, opts.tap_layers, opts.dtype, raw / GRAPH_NAME, exporter,
                           opts.progress, opts.tap_norm, opts.summary_row, stats)
    del stats
    release_weights(torch_model)
    del torch_model
    gc.collect()

    specs = tap_specs(opts.tap_layers, widths, opts.formats, opts.block_size)
    inputs, outputs, external, weight_quant, fusions = _write_graph(folder, raw, plan, specs, step)
    if smoothing:
        weight_quant = {**weight_quant, "smoothing": smoothing}
    fused = None
    if opts.quant_op == "custom":
        step(f"writing {FUSED_GRAPH_NAME} (com.mobillm quantizers, weights shared with {GRAPH_NAME})")
        fused = _write_fused_graph(folder, specs)
    tensorrt = None
    if opts.trt:
        step(f"building the TensorRT plan {trt_plan.PLAN_NAME} (ONNX parser, fp16 builder)")
        tensorrt = trt_plan.build_plan(folder, fused or GRAPH_NAME, opts.quant_op, family.max_length(config))

    step("writing manifest.json")
    manifest = Manifest(
        model_id=source.model_id,
        family=family.name,
        config=json.loads(config.to_json_string(use_diff=False)),
        num_layers=family.num_layers(config),
        layer_groups=opts.blocks,
        taps=[TapSpec(layer, s["hidden"], s["fmt"], opts.block_size, codes_output=s["codes"], scales_output=s["scales"])
              for layer, s in zip(opts.tap_layers, specs)],
        head_hidden=widths[-1],
        max_length=family.max_length(config),
        compute_dtype=opts.dtype,
        weights=opts.weights,
        graph=GRAPH_NAME,
        tokenizer_dir=TOKENIZER_DIR,
        inputs=inputs,
        outputs=outputs,
        opset=onnx_codec.OPSET,
        quant_op=opts.quant_op,
        fused_graph=fused,
        custom_op={"domain": onnx_codec.CUSTOM_DOMAIN, "version": onnx_codec.CUSTOM_OPSET} if fused else None,
        pad_token_id=_pad_id(plan.tokenizer, config),
        tokens=rules,
        tap_norm=opts.tap_norm,
        conditioning=conditioning,
        summary_row=opts.summary_row,
        gguf=source.gguf.to_dict() if source.gguf else None,
        exporter={**exporter_versions(), "exporter": f"torch.onnx.export ({exporter})"},
        source=source.kind,
        seed=opts.seed if source.kind == "random-init" else None,
        overrides=opts.overrides,
        external_data=external,
        weight_quant=weight_quant,
        ort_fusions=fusions,
        tensorrt=tensorrt,
        export_options=opts.to_dict(),
        row_input=ROW_INPUT if opts.tap_rows else None,
        tap_switch=tap_switch(opts.switch_formats, len(specs)) if opts.switch_formats else None,
    )
    manifest.save(folder)
    return manifest


CALIBRATION_MAX_LEN = 128  # tokens per calibration row: statistics of typical rows, not of long documents


def _pad_id(tok, config) -> int:
    """The pad id the device fills batches with: the tokenizer's, else the config's, else 0."""
    pad = tok.pad_token_id if tok.pad_token_id is not None else config.pad_token_id
    return int(pad if pad is not None else 0)


def _write_graph(folder: Path, raw: Path, plan: Plan, specs: list[dict], step: _Stages):
    """Fuse, splice the codec into the traced graph and write it with its weights in their format:
    (graph inputs, graph outputs, external-data name, weight_quant settings, ort_fusions record)."""
    import onnx

    opts = plan.options
    onnx_model = onnx.load(str(raw / GRAPH_NAME), load_external_data=False)
    # Before the codec is spliced in, so the optimizer never sees (or rewrites) the quantizers.
    onnx_model, fusions = optimize.fuse(onnx_model, plan.family, plan.config, opts.ort_fusions, opts.progress)
    step(f"adding in-graph quantizers ({opts.quant}, block {opts.block_size})"
         + (f"; ORT fusions {_counts(fusions['fused'])}" if fusions else ""))
    # Standard ops; --quant-op custom derives the fused graph from the finished graph later.
    onnx_codec.append_quantizers(onnx_model, specs, rows=ROW_INPUT if opts.tap_rows else None,
                                 switch=(SWITCH_INPUT, opts.switch_formats) if opts.switch_formats else None)
    exclude = codec_node_names(onnx_model)
    inputs, outputs = io_specs(onnx_model)

    step(f"writing {GRAPH_NAME} (weights {opts.weights})")
    weight_quant = {}
    if weights.streamed_as_exported(onnx_model, raw, opts.dtype, opts.weights):
        weights.keep_streamed(onnx_model, raw, folder)
    elif opts.weights == "gguf":
        weight_quant, _ = weights.write_gguf(onnx_model, raw, folder, plan.source.gguf.file, opts.widen,
                                                    opts.progress)
        del onnx_model
    elif opts.weights in weights.QUANTIZED:
        stage = folder / "_stage"
        weights.stage_for_quantization(onnx_model, raw, stage)
        del onnx_model  # here, in its owner's frame: ORT's quantizer loads its own copy next
        shutil.rmtree(raw)
        gc.collect()
        weight_quant, _ = weights.quantize_staged(stage, folder, opts.weights, exclude, opts.int8_kernel)
    else:
        weights.write_float(onnx_model, raw, folder, opts.dtype, opts.weights)
        del onnx_model
    shutil.rmtree(raw, ignore_errors=True)
    gc.collect()
    # Every engine, whatever its size, ends with its weights in EXTERNAL_DATA_NAME (ORT maps the file);
    # the writers leave them there already past 2 GiB.
    return inputs, outputs, move_weights_out(folder), weight_quant, fusions


def _counts(fused: dict) -> str:
    return ", ".join(f"{op} x{n}" for op, n in fused.items()) or "none matched"


class _Stages:
    """One line per stage on stderr: [stage/total elapsed] what is starting."""

    def __init__(self, enabled: bool, total: int):
        self.enabled, self.total, self.n = enabled, total, 0
        self.t0 = time.perf_counter()

    def __call__(self, what: str) -> None:
        self.n += 1
        if self.enabled:
            elapsed = time.perf_counter() - self.t0
            print(f"[{self.n}/{self.total} {elapsed:6.1f}s] {what}", file=sys.stderr, flush=True)


def exporter_versions() -> dict[str, str]:
    """Versions of the packages that made the engine, for the manifest's `exporter`."""
    import onnx
    import onnxruntime
    import torch
    import transformers

    from importlib.metadata import PackageNotFoundError, version

    try:
        mobillm = version("mobillm")
    except PackageNotFoundError:
        mobillm = "unknown"
    return {"mobillm": mobillm, "torch": torch.__version__, "transformers": transformers.__version__,
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "python": sys.version.split()[0]}


def check_out(out: Path, force: bool) -> None:
    """--out must be new (or replaceable with --force) and creatable: its nearest existing parent a
    writable folder (not a file, not /proc)."""
    if out.exists() and not force:
        raise ExportError(f"{out} already exists; pass --force to replace it or choose another --out")
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a folder; remove it or choose another --out")
    parent = Path(out).absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ExportError(f"--out {out}: {parent} is a file, not a folder; choose another --out")
    if not os.access(parent, os.W_OK) or str(parent).startswith(("/proc", "/sys")):
        raise ExportError(f"--out {out}: cannot write under {parent}; choose another --out")


FUSED_GRAPH_NAME = "backbone.fused.onnx"


def _write_fused_graph(folder: Path, specs: list[dict]) -> str:
    """Write FUSED_GRAPH_NAME: the finished graph (weights already in their format) with each tap's
    standard-op quantizer replaced by one com.mobillm node. Both graphs read the one weights file
    `_write_graph` left beside the graph. No op library is needed to export."""
    import onnx

    model = onnx.load(str(folder / GRAPH_NAME), load_external_data=False)
    onnx_codec.fuse_quantizers(model, specs)
    onnx.save_model(model, str(folder / FUSED_GRAPH_NAME))
    return FUSED_GRAPH_NAME


# ----------------------------------------------------------------------------- the folder, atomically

def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_partials(out: Path) -> list[Path]:
    """Remove what an export killed mid-way (SIGKILL, out of memory, a crash in native code) left
    beside `out`: `.NAME.partial-PID-*` / `.NAME.old-PID-*` folders whose process is gone. Folders of
    a live export (same name, another process) are left alone. Returns what was removed."""
    removed = []
    for kind in ("partial", "old"):
        for path in out.parent.glob(f".{out.name}.{kind}-*"):
            m = re.fullmatch(rf"\.{re.escape(out.name)}\.{kind}-(\d+)-.*", path.name)
            if path.is_dir() and m and not _pid_alive(int(m.group(1))):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished temp folder to `out`, replacing an old engine only at the very end."""
    if out.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{os.getpid()}-", dir=out.parent))
        out.rename(trash / out.name)
        tmp.rename(out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        tmp.rename(out)


# ----------------------------------------------------------------------------- what was written

def file_sizes(folder: Path, manifest: Manifest) -> dict[str, int]:
    """Bytes of every file the manifest lists, by relative path."""
    return {rel: (Path(folder) / rel).stat().st_size for rel in manifest.files}


def summary(folder: Path, manifest: Manifest) -> str:
    """What was written: files and sizes, taps, and wire bytes per token."""
    folder = Path(folder)
    sizes = file_sizes(folder, manifest)
    lines = [f"engine {folder}  ({manifest.model_id}, {manifest.family}, {manifest.num_layers} layers, "
             f"compute {manifest.compute_dtype}, weights {manifest.weights})"]
    for rel, size in sizes.items():
        lines.append(f"  {rel:<40} {_human(size):>10}")
    lines.append(f"  total {_human(sum(sizes.values())):>45}")
    lines.append(f"blocks {comma_list(manifest.layer_groups)}")
    lines.append("tap  layer  width  format  block  bytes/token  outputs")
    for i, t in enumerate(manifest.taps):
        lines.append(f"{i:>3}  {t.layer:>5}  {t.hidden:>5}  {t.fmt:>6}  {t.block_size:>5}  {t.bytes_per_token:>11}  "
                     f"{t.codes_output}, {t.scales_output}")
    lines.append(f"wire: {manifest.bytes_per_token()} bytes per sample per token (all taps); "
                 f"head reads {manifest.head_hidden} wide; max_length {manifest.max_length}")
    return "\n".join(lines)


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
