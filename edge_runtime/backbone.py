"""The frozen backbone on the device: tokenizer + ONNX Runtime session from an engine folder.

Forward passes only. Taps leave the graph already quantized (codes + fp16 scales).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from mobillm.common.manifest import Manifest, ManifestError, TapSpec
from mobillm.common.options import option
from mobillm.common.procfs import trim_heap
from mobillm.common.tokenize import EngineTokenizer, TokenizerFilesMissing
from mobillm.kernels import codec

from .session import QUANTIZERS, open_session

log = logging.getLogger("mobillm.edge")

PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


@dataclass(frozen=True)
class EngineOptions:
    """Which engine folder to open and how ONNX Runtime runs it (edge-run's engine flags)."""

    engine: Path = option(help="engine folder made by export-backbone", parse=Path, metavar="DIR")
    provider: str = option("cpu", "ONNX Runtime execution provider (falls back to cpu with a message if missing)",
                           choices=tuple(PROVIDERS))
    threads: int | None = option(None, "ORT intra-op threads (default: all cores)")
    prepack: bool = option(False, "let ORT keep pre-packed copies of the weights: up to ~10 percent faster on some "
                                  "CPUs, ~30 percent more peak memory (memory is the device's scarcest resource)")
    mem_pattern: bool = option(False, "let ORT plan one arena block per input shape from the second call on: no "
                                      "speed gain measured here, ~160 MiB more peak memory on Gemma 3 270M")
    quantizer: str = option("auto", "tap quantizer: fused (the engine's com.mobillm graph with this device's op "
                                    "library), standard (standard ONNX ops, runs anywhere), auto = fused where it "
                                    "loads, else standard with a one-line notice", choices=QUANTIZERS)

    def open(self) -> Backbone:
        """The engine's ORT session with these options."""
        return Backbone(self.engine, self.provider, self.threads, prepack=self.prepack, quantizer=self.quantizer,
                        mem_pattern=self.mem_pattern)


@dataclass
class TapOutput:
    """One tap of a batch as the graph returned it: every position of the padded batch
    (`keep="all"`: codes [B, T, code_bytes], scales [B, T, n_blocks]) or only the kept rows
    (`"pooled"`, `"tokens"`: [rows, code_bytes], [rows, n_blocks], in `row_indices` order)."""

    spec: TapSpec
    codes: np.ndarray  # uint8 (fp16 format: float16 [..., H])
    scales: np.ndarray  # float16


KEEP = ("all", "pooled", "tokens", "summary")


def row_indices(lengths: np.ndarray, width: int, keep: str, summary_row: bool = False) -> np.ndarray:
    """Flat int64 indices into the taps' batch x positions of the rows `keep` selects: each row's
    last real token (pooled), its last token then its summary row (summary: the masked mean of its
    tokens, the position after them in engines with `summary_row`), every real token row by row
    (tokens), or every token position (all)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    stride = width + 1 if summary_row else width  # a summary row is one more position per row
    starts = np.arange(len(lengths), dtype=np.int64) * stride
    if keep == "pooled":
        return starts + lengths - 1
    if keep == "summary":
        if not summary_row:
            raise ValueError("this engine has no summary row (exported before --summary-row, or with --no-tap-rows); "
                             "re-export it, or send pooled or tokens")
        return np.stack([starts + lengths - 1, starts + width], axis=1).reshape(-1)
    if keep in ("tokens", "all"):
        limit = lengths[:, None] if keep == "tokens" else np.full((len(lengths), 1), width)
        rows, cols = np.nonzero(np.arange(width)[None, :] < limit)
        return (rows * stride + cols).astype(np.int64)
    raise ValueError(f"unknown row selection {keep!r}; choose one of {', '.join(KEEP)}")


class Backbone:
    """ORT session over an engine folder; `forward` returns the quantized taps of a batch."""

    def __init__(self, engine: Path | str, provider: str = "cpu", threads: int | None = None, verify: bool = True,
                 prepack: bool = False, quantizer: str = "auto", op_library: Path | str | None = None,
                 mem_pattern: bool = False):
        """`quantizer` and `op_library`: which graph runs, see edge_runtime/session.py.
        `prepack=False` (the default) turns off ORT's weight pre-packing: on CPU it keeps a
        second, re-laid-out copy of every MatMul weight, ~30 % of the session's peak memory
        (docs/benchmarks.md, "ORT weight pre-packing"), for a speed gain we measured at 0-10 %.
        `mem_pattern=False` (the default) turns off ORT's memory pattern: from a shape's second call it
        allocates that shape's whole plan as one block, which raised the peak by ~160 MiB on Gemma for no
        speed we could measure (docs/benchmarks.md, "Device memory: what loading costs").
        The tokenizer loads first and the C heap is trimmed after it: its parse is the process's largest
        transient (Gemma's leaves ~190 MiB of freed pages mapped), which would otherwise stay under the session."""
        self.folder = Path(engine)
        if not self.folder.is_dir():
            raise ManifestError(f"{self.folder}: engine folder not found; run export-backbone first and copy its --out here")
        self.manifest = Manifest.load(self.folder, verify=verify)
        self.provider = provider
        try:
            self.tokenizer = EngineTokenizer(self.folder / self.manifest.tokenizer_dir, self.manifest.token_rules)
        except TokenizerFilesMissing as exc:
            raise ManifestError(str(exc)) from None
        trim_heap()
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        if not prepack:
            opts.add_session_config_entry("session.disable_prepacking", "1")
        opts.enable_mem_pattern = mem_pattern
        self.engine_session = open_session(self.folder, self.manifest, opts, choose_providers(provider, self.folder),
                                           quantizer, op_library)
        self.session = self.engine_session.session
        trim_heap()
        self._outputs = [name for t in self.manifest.taps for name in t.graph_outputs]

    def _switch_outputs(self, formats: list[str]) -> list[str]:
        """Per tap, the format-switch outputs that hold `formats[k]`: (codes, scales), or (fp16, fp16)."""
        if not self.manifest.tap_switch:
            raise ManifestError(f"{self.folder}: this engine has no run-time format switch; re-export it to send "
                                f"{formats}")
        names = []
        for k, fmt in enumerate(formats):
            out = self.manifest.tap_switch["outputs"][k]
            names += [out["fp16"], out["fp16"]] if fmt == "fp16" else [out["codes"], out["scales"]]
        return names

    @property
    def max_length(self) -> int:
        return int(self.manifest.max_length)

    def tokenize(self, texts: tuple[str, ...], max_len: int) -> tuple[np.ndarray, bool]:
        """Token ids of one example, truncated to `max_len`; second value says whether it was cut."""
        ids = self.tokenizer.encode(texts)
        limit = min(max_len, self.max_length)
        return np.asarray(ids[:limit], dtype=np.int64), len(ids) > limit

    def forward(self, rows: list[np.ndarray], keep: str = "all",
                formats: list[str] | None = None) -> tuple[list[TapOutput], np.ndarray]:
        """Run one right-padded batch; returns the taps (the rows `keep` selects, see `TapOutput`)
        and the real length of each row. Engines with a row input (manifest `row_input`) quantize
        only the kept rows in the graph; older engines quantize every token and are sliced here.
        `formats` (one per tap, all in `manifest.switch_formats`): the taps in those formats, chosen
        by the graph's format input (export --tap-formats); None: the engine's own formats."""
        if formats is not None:
            missing = sorted(set(formats) - set(self.manifest.switch_formats))
            if missing:
                raise ValueError(f"the engine cannot switch taps to {', '.join(missing)} in the graph "
                                 f"(its --tap-formats: {', '.join(self.manifest.switch_formats) or 'none'})")
        lengths = np.array([len(r) for r in rows], dtype=np.int64)
        width = int(lengths.max())
        ids = np.full((len(rows), width), self.manifest.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = r
            mask[i, : len(r)] = 1
        index = row_indices(lengths, width, keep, self.manifest.summary_row)
        feeds = {"input_ids": ids, "attention_mask": mask}
        if self.manifest.row_input:
            feeds[self.manifest.row_input] = index
        feeds.update(self.manifest.switch_feed(formats))
        arrays = self.session.run(self._outputs if formats is None else self._switch_outputs(formats), feeds)
        taps = []
        for k, spec in enumerate(self.manifest.taps):
            codes, scales = arrays[2 * k], arrays[2 * k + 1]
            if formats is not None:
                spec = dataclasses.replace(spec, fmt=formats[k])
                if formats[k] == "fp16":
                    scales = np.zeros(codes.shape[:-1] + (0,), np.float16)
            if self.manifest.row_input and keep == "all":
                codes, scales = codes.reshape(len(rows), width, -1), scales.reshape(len(rows), width, -1)
            elif not self.manifest.row_input and keep != "all":
                codes = codes.reshape((len(rows) * width,) + codes.shape[2:])[index]
                scales = scales.reshape((len(rows) * width,) + scales.shape[2:])[index]
            taps.append(TapOutput(spec, codes, scales))
        check_finite(taps, lengths, index, width, self.manifest.summary_row)
        return taps, lengths


def check_finite(taps: list[TapOutput], lengths: np.ndarray, index: np.ndarray, width: int,
                 summary_row: bool = False) -> None:
    """A NaN scale marks a block that held NaN/Inf: never send it; name the tap instead.
    `index` are the taps' rows as flat positions in batch x positions (`row_indices`); padding is not checked."""
    row, tok = np.divmod(index, width + 1 if summary_row else width)
    real = (tok < lengths[row]) | (tok == width)  # tok == width only for a summary row
    for k, tap in enumerate(taps):
        if tap.spec.fmt == "fp16":
            valid = np.isfinite(tap.codes.reshape(len(index), -1))
        else:
            valid = ~np.isnan(tap.scales.reshape(len(index), -1))
        bad = ~valid.all(axis=-1) & real
        if bad.any():
            i = int(np.argmax(bad))
            raise codec.NonFiniteActivation(f"tap {k} (layer {tap.spec.layer}): non-finite activation at row "
                                            f"{int(row[i])}, token {int(tok[i])}; the backbone produced NaN/Inf, "
                                            f"nothing was sent")


def choose_providers(provider: str, folder: Path) -> list:
    """ORT providers for `provider`, falling back to CPU with a clear message when unavailable."""
    if provider not in PROVIDERS:
        raise ValueError(f"unknown provider {provider!r}; choose cpu, cuda or tensorrt")
    available = set(ort.get_available_providers())
    wanted = PROVIDERS[provider]
    if wanted[0] not in available:
        log.warning("provider %s is not available in this onnxruntime build (%s); falling back to CPU. "
                    "Install onnxruntime-gpu (or the JetPack wheel on Jetson) to use it.", provider,
                    ", ".join(sorted(available)))
        return ["CPUExecutionProvider"]
    out: list[str | tuple[str, dict]] = []
    for name in wanted:
        if name == "TensorrtExecutionProvider":
            cache = folder / "trt_cache"
            cache.mkdir(exist_ok=True)
            out.append((name, {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache),
                               "trt_fp16_enable": True}))
        elif name in available:
            out.append(name)
    return out
