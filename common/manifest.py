"""`manifest.json`: the contract between the exporter and everything downstream.

Torch-free on purpose: the device reads it with the standard library alone.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mobillm.common import schema
from mobillm.common.errors import BadInput
from mobillm.common.schema import rule
from mobillm.common.taps import TapSpec
from mobillm.kernels import codec

__all__ = ["MANIFEST_NAME", "MANIFEST_VERSION", "TEXT_HYGIENE", "Manifest", "ManifestError", "TapSpec",
           "manifest_digest", "sha256_file"]

MANIFEST_VERSION = 1
MANIFEST_NAME = "manifest.json"
# Every text segment is stripped of leading and trailing whitespace before it is tokenized
# (common/tokenize.py): GLUE rows end with a space that Gemma's tokenizer turns into a lone "▁",
# which was then the last token, the one row a pooled side network reads, of every row.
TEXT_HYGIENE = "strip"


class ManifestError(BadInput, ValueError):
    """The engine folder or its manifest is unusable; the message says why and what to do."""


@dataclass
class Manifest:
    model_id: str
    family: str
    config: dict
    num_layers: int = rule(min=1)
    # Decoder layers between consecutive taps ("blocks" on disk; not the quantization block_size).
    layer_groups: list[int] = rule(key="blocks", min=0)
    taps: list[TapSpec] = rule()
    head_hidden: int = rule(min=1)
    max_length: int = rule(min=1)
    compute_dtype: str = "fp32"
    weights: str = "fp32"
    graph: str = "backbone.onnx"
    tokenizer_dir: str = "tokenizer"
    inputs: list[dict] = field(default_factory=list)
    outputs: list[dict] = field(default_factory=list)
    opset: int = 18
    quant_op: str = "onnx"  # "onnx": standard-op quantizers only; "custom": also `fused_graph`
    # Engines from before fused_graph existed: `graph` itself holds the com.mobillm nodes and this
    # is the export machine's copy of the op library (the device prefers its own; edge_runtime/session.py).
    custom_op_library: str | None = None
    # The graph again with one com.mobillm node per tap quantizer instead of the standard ops,
    # sharing `graph`'s weights file (external_data); the device picks one at load time.
    fused_graph: str | None = None
    custom_op: dict | None = None  # {"domain": "com.mobillm", "version": N}: the op set those nodes use
    pad_token_id: int = 1
    files: dict[str, str] = field(default_factory=dict)  # relative path -> sha256
    exporter: dict[str, str] = field(default_factory=dict)
    format_version: int = MANIFEST_VERSION
    # Where the weights came from, so `export-backbone verify DIR` can rebuild the torch reference:
    # "hub" (model_id is a Hugging Face id), "checkpoint" (model_id is a local folder) or
    # "random-init" (weights drawn with torch.manual_seed(seed) from `config`).
    source: str = "hub"
    seed: int | None = None
    overrides: dict = field(default_factory=dict)  # --set key=value applied to the config
    external_data: str | None = None  # "backbone.onnx.data" when the weights live outside the graph file
    weight_quant: dict = field(default_factory=dict)  # ORT weight-only quantization settings, if any
    # ONNX Runtime transformer fusions applied at export (export/optimize.py): tool, onnxruntime
    # version, model_type, fused op counts. None: none ran (or an engine made before they existed).
    ort_fusions: dict | None = None
    # How the device frames a row's ids (the family's rules, see export/families.py TokenRules):
    # {"bos_id": int | None, "bos_each_segment": bool, "eos_id": int | None}. Empty in engines made
    # before it existed: then BOS = config["bos_token_id"] before every segment (OPT's rule).
    tokens: dict = field(default_factory=dict)
    tap_norm: str = "none"  # "rms": the hidden state divided by its RMS; "layer": through the next layer's input norm
    gguf: dict | None = None  # the GGUF the weights were converted from: file, sha256, architecture
    # export-backbone --trt: the TensorRT plan beside the graph (plan file, TensorRT version, plugin
    # library, fp16, optimization profile per input). None: no plan (and in engines made before it existed).
    tensorrt: dict | None = None
    # The resolved export options the engine was made with (export/options.py ExportOptions.to_dict();
    # exporting with them again gives the same engine). None in engines made before it existed.
    export_options: dict | None = None
    # Name of the graph input of flat row indices (int64 [rows], into batch x seq) when the engine
    # quantizes only the rows fed there (tap outputs [rows, ...]); None: every token ([batch, seq, ...]).
    row_input: str | None = None
    # export-backbone --tap-formats: each tap's format is also chosen per run by an int64 graph input:
    # {"input": name, "formats": [fmt, ...] (input value k picks formats[k]), "outputs": per tap
    # {"codes", "scales": the byte formats' outputs, "fp16": the fp16 one}}. Only the chosen
    # quantizer runs (ONNX If). None: one format per tap (and in engines made before it existed).
    tap_switch: dict | None = None
    # What the device does to taps before the quantizer, beyond `tap_norm` (DESIGN: recorded here,
    # checked before a side network meets these taps). `conditioning`: --tap-norm channel's record,
    # {"calibration": source, "sha256": of that text, "rows": n, "file": stats file, "stats_sha256"}.
    # `summary_row`: each tap holds one more position per row after its tokens, the masked mean of
    # its real tokens (edge-run --send summary sends it beside the last token).
    conditioning: dict | None = None
    summary_row: bool = False

    @property
    def preparation(self) -> dict:
        """How text and taps are prepared on the device; a side network trained on one preparation
        is never applied to another (edge_runtime/predict.py checks it against the side network's)."""
        return {"text": TEXT_HYGIENE, "tap_norm": self.tap_norm,
                "conditioning": (self.conditioning or {}).get("stats_sha256")}

    @property
    def switch_formats(self) -> tuple[str, ...]:
        """The formats the graph can switch each tap to at run time (empty: none, the engine's own only)."""
        return tuple(self.tap_switch["formats"]) if self.tap_switch else ()

    def switch_feed(self, formats: list[str] | None = None) -> dict:
        """The graph input choosing each tap's run-time format: `formats` (one per tap; each must be in
        `switch_formats`), or when None the cheapest to compute (fp16: a cast). Empty without a switch."""
        if not self.tap_switch:
            return {}
        known = self.tap_switch["formats"]
        if formats is None:
            formats = ["fp16" if "fp16" in known else known[0]] * len(self.taps)
        return {self.tap_switch["input"]: np.array([known.index(f) for f in formats], np.int64)}

    @property
    def token_rules(self) -> dict:
        """{"bos_id", "bos_each_segment", "eos_id"}: how the device frames a row's ids."""
        return self.tokens or _opt_token_rules(self.config)

    def __post_init__(self):
        try:
            schema.check(self)  # the fields' types and rules, each tap's, then cross_check()
        except schema.SchemaError as exc:
            raise ManifestError(f"manifest field {exc}") from None

    def cross_check(self) -> None:
        """The rules across fields (schema.check runs it after the fields' own)."""
        if self.format_version != MANIFEST_VERSION:
            raise ManifestError(f"manifest format version {self.format_version} is not supported "
                                f"(this mobillm reads version {MANIFEST_VERSION}); re-export the engine")
        if sum(self.layer_groups) != self.num_layers:
            raise ManifestError(f"blocks {self.layer_groups} sum to {sum(self.layer_groups)}, "
                                f"not {self.num_layers} layers")
        if not self.taps:
            raise ManifestError("manifest lists no taps")
        for i, tap in enumerate(self.taps):
            if not 1 <= tap.layer <= self.num_layers:
                raise ManifestError(f"tap layer {tap.layer} outside 1..{self.num_layers}")
            if tap.codes_output is None or tap.scales_output is None:
                raise ManifestError(f"taps[{i}] names no codes_output and scales_output; re-export the engine")
        if self.taps[-1].layer != self.num_layers:
            raise ManifestError("the final layer must be tapped (the head reads it)")
        if self.tap_switch is not None:
            if not {"input", "formats", "outputs"} <= self.tap_switch.keys() or \
                    len(self.tap_switch["outputs"]) != len(self.taps):
                raise ManifestError("tap_switch needs input, formats and one outputs entry per tap; re-export")
            for fmt in self.tap_switch["formats"]:
                codec.check_format(fmt)
        if self.fused_graph and not (isinstance(self.custom_op, dict) and {"domain", "version"} <= self.custom_op.keys()):
            raise ManifestError("the manifest names a fused_graph but not its custom_op domain and version; re-export")

    @property
    def tap_layers(self) -> list[int]:
        return [t.layer for t in self.taps]

    def bytes_per_token(self) -> int:
        """Wire bytes of all taps for one token (tokens mode)."""
        return sum(t.bytes_per_token for t in self.taps)

    def to_dict(self) -> dict:
        return schema.dump(self)

    def save(self, folder: Path | str) -> Path:
        """Record checksums of the engine files, then write manifest.json."""
        folder = Path(folder)
        self.files = {
            p.relative_to(folder).as_posix(): sha256_file(p)
            for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != MANIFEST_NAME
        }
        path = folder / MANIFEST_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def from_dict(cls, data) -> "Manifest":
        """A manifest from its JSON data, of any format version this mobillm reads (READERS)."""
        if not isinstance(data, dict):
            raise ManifestError("not a manifest (a JSON object); re-export the engine")
        try:
            data = schema.migrate(data, "manifest", "format_version", READERS)
        except schema.SchemaError as exc:
            raise ManifestError(f"{exc}; re-export the engine") from None
        try:
            return schema.load(cls, data)
        except schema.SchemaError as exc:
            raise ManifestError(f"manifest field {exc}; re-export the engine") from None

    @classmethod
    def load(cls, folder: Path | str, verify: bool = True) -> "Manifest":
        """Read an engine folder's manifest; with `verify`, check every file's sha256."""
        folder = Path(folder)
        path = folder / MANIFEST_NAME
        if not path.is_file():
            raise ManifestError(f"{folder}: no {MANIFEST_NAME}; is this an engine folder made by export-backbone?")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ManifestError(f"{path}: not valid JSON ({exc})") from None
        try:
            manifest = cls.from_dict(data)
        except ManifestError as exc:
            raise ManifestError(f"{path}: {exc}") from None
        if verify:
            manifest.verify_files(folder)
        return manifest

    def verify_files(self, folder: Path | str) -> None:
        folder = Path(folder)
        for rel, digest in self.files.items():
            p = folder / rel
            if not p.is_file():
                raise ManifestError(f"{folder}: file {rel} listed in the manifest is missing")
            if sha256_file(p) != digest:
                raise ManifestError(f"{folder}: checksum mismatch for {rel}; the engine is corrupt or was "
                                    f"modified; copy it again from the export machine")


def _opt_token_rules(config: dict) -> dict:
    """The rule of engines made before `tokens` existed (all OPT): BOS = config["bos_token_id"]
    before every segment, no EOS."""
    return {"bos_id": config.get("bos_token_id"), "bos_each_segment": True, "eos_id": None}


def _read_v1(data: dict) -> dict:
    """A format-1 manifest as this code loads it: engines made before `tokens` existed get the rule
    they were made with written out (schema.migrate; a format 2 would chain through this step)."""
    if not data.get("tokens") and isinstance(data.get("config"), dict):
        data["tokens"] = _opt_token_rules(data["config"])
    return data


READERS = {MANIFEST_VERSION: _read_v1}  # format version -> the step that brings it to this code's shape


def sha256_file(path: Path | str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def manifest_digest(folder: Path | str) -> str:
    """sha256 of manifest.json itself: identifies an engine in the hello message."""
    return sha256_file(Path(folder) / MANIFEST_NAME)
