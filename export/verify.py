"""Check an engine against the torch model it was exported from.

The graph runs in ONNX Runtime on a few real sentences (tokenized with the engine's own
tokenizer.json, as the device does); each tap is decoded with the reference codec and compared
with HF `hidden_states[layer]` of the fp32 torch model, on real (unpadded) tokens only.

Pass rule per tap, in relative RMS error ||decoded - ref|| / ||ref||:
    engine_err <= MARGIN * codec_err + backbone_tolerance
where codec_err is what the codec alone costs on the torch reference (`codec.relative_rms_error`)
and backbone_tolerance is what ORT may add before the codec (fp32 kernels, fp16 compute, ORT
weight-only quantization). A wrong layer, wrong mask or broken codec gives errors near 1.

Engines with quantized weights (int8, int4, gguf) pass two more checks per tap, against what the
fp32 engine would send (the torch reference through the same codec, `coded`), with measures that
outlier channels cannot dominate (on Gemma 3 one channel holds ~90 % of a tap's squared norm, so a
relative RMS error only sees that channel):
    channel_err(decoded, coded) <= CHANNEL_TOLERANCE[weights]
        each channel's RMS difference divided by that channel's own spread over the tokens
        (per-channel standardized), RMS over channels
    probe_agree(decoded, coded) >= PROBE_AGREEMENT[weights]
        the share of (token, probe) pairs where fixed random linear probes on the standardized
        channels give the engine's tap the sign they give the coded reference
Today's int8 Gemma engine (quantize_dynamic, per-tensor uint8 activations) fails these although it
passes the relative RMS bound (docs/export.md, "Verification").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mobillm.common.errors import CheckFailed
from mobillm.common.manifest import Manifest
from mobillm.kernels import codec

from .families import family_for
from .source import model_from_manifest

SENTENCES = [
    "A photo of a cat sitting on a warm windowsill.",
    "Hello world",
    "The committee approved the budget after a long debate about schools and roads.",
    "It was the best of times, it was the worst of times, it was the age of wisdom.",
    "Quantized activations travel from the phone to the server.",
]
MARGIN = 1.25
# Per-channel standardized error ORT's weights may add (quantized weight formats only).
CHANNEL_TOLERANCE = {"gguf": 0.05, "int8": 0.30, "int4": 0.80}
# Minimum sign agreement of the random probes with torch (quantized weight formats only).
PROBE_AGREEMENT = {"gguf": 0.98, "int8": 0.90, "int4": 0.75}
PROBES = 64


def backbone_tolerance(compute_dtype: str, weights: str) -> float:
    """Relative RMS error ORT may add to a tap before quantization, for this engine's precision."""
    # Weight-only quantization moves every layer: opt-125m random-init measured 0.04 (int8) and
    # 0.22-0.25 (int4); these bounds catch wiring errors (error ~1), not quality regressions.
    if weights == "gguf":  # the GGUF's own weights: the torch reference is their dequantized copy
        return 2e-3
    if weights == "int4":
        return 0.5
    if weights == "int8":
        return 0.25
    if compute_dtype == "fp16":
        return 2e-2
    if weights == "fp16":
        return 5e-3
    return 1e-3


class VerificationFailed(CheckFailed):
    """An engine's taps are further from the torch model than the error bound allows (exit 1);
    `report.table()` shows each tap."""

    def __init__(self, report: "VerifyReport", out: Path | str):
        super().__init__(f"the engine failed verification; nothing was written to {out}")
        self.report = report


@dataclass
class TapCheck:
    tap: int
    layer: int
    width: int
    fmt: str
    codec_err: float  # relative RMS error of the codec alone on the torch reference
    engine_err: float  # relative RMS error of the decoded engine output vs the torch reference
    limit: float
    note: str = ""
    channel_err: float = math.nan  # per-channel standardized error vs the coded reference (quantized weights)
    channel_limit: float = math.inf
    probe_agree: float = math.nan  # random-probe sign agreement with the coded reference (quantized weights)
    probe_limit: float = 0.0

    @property
    def ok(self) -> bool:
        return (math.isfinite(self.engine_err) and self.engine_err <= self.limit
                and (math.isnan(self.channel_err) or self.channel_err <= self.channel_limit)
                and (math.isnan(self.probe_agree) or self.probe_agree >= self.probe_limit))


@dataclass
class VerifyReport:
    checks: list[TapCheck]
    sentences: int
    tokens: int
    tolerance: float
    fused_note: str = ""  # engines with a fused graph: whether it gave the standard graph's bytes

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def table(self) -> str:
        lines = [f"verify: {self.sentences} sentences, {self.tokens} real tokens; pass if engine_err <= "
                 f"{MARGIN} x codec_err + {self.tolerance:g}",
                 "tap  layer  width  format  codec_err  engine_err     limit  result"]
        channels = any(not math.isnan(c.channel_err) for c in self.checks)
        if channels:
            lines[0] += "; and vs the coded reference: channel_err <= ch_limit, probe_agree >= p_limit"
            lines[1] += "  channel_err  ch_limit  probe_agree  p_limit"
        for c in self.checks:
            extra = (f"  {c.channel_err:>11.2e}  {c.channel_limit:>8.2e}  {c.probe_agree:>11.3f}  {c.probe_limit:>7.3f}"
                     if channels else "")
            lines.append(f"{c.tap:>3}  {c.layer:>5}  {c.width:>5}  {c.fmt:>6}  {c.codec_err:>9.2e}  "
                         f"{c.engine_err:>10.2e}  {c.limit:>8.2e}  {'ok' if c.ok else 'FAIL'}" + extra
                         + (f"  {c.note}" if c.note else ""))
        if self.fused_note:
            lines.append(f"verify: {self.fused_note}")
        lines.append("verify: " + ("all taps within bounds" if self.ok else "FAILED"))
        return "\n".join(lines)


def tokenize(folder: Path, manifest: Manifest, sentences: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded (input_ids, attention_mask) int64, tokenized exactly as the device does."""
    from mobillm.common.tokenize import EngineTokenizer

    tok = EngineTokenizer(Path(folder) / manifest.tokenizer_dir, manifest.token_rules)
    rows = [tok.encode((s,))[: manifest.max_length] for s in sentences]
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), manifest.pad_token_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
    return ids, mask


def run_graph(folder: Path, manifest: Manifest, ids: np.ndarray, mask: np.ndarray,
              quantizer: str = "standard") -> list[np.ndarray]:
    """The raw tap outputs (codes, scales, codes, ...) of one ORT forward of the graph the device
    would open with `quantizer` (edge_runtime/session.py). An engine with a row input is fed the
    real tokens' positions, so its outputs hold the real tokens only, row-major."""
    import onnxruntime as ort

    from mobillm.edge_runtime.session import open_session

    engine = open_session(folder, manifest, ort.SessionOptions(), ["CPUExecutionProvider"],
                          "auto" if manifest.custom_op_library else quantizer)
    names = [n for t in manifest.taps for n in t.graph_outputs]
    feeds = {"input_ids": ids, "attention_mask": mask}
    if manifest.row_input:
        feeds[manifest.row_input] = np.flatnonzero(tap_positions(manifest, mask)).astype(np.int64)
    feeds.update(manifest.switch_feed())
    return engine.session.run(names, feeds)


def tap_positions(manifest: Manifest, mask: np.ndarray) -> np.ndarray:
    """bool [B, T (+1)]: the tap positions that hold real rows: the real tokens, and with a summary
    row the extra position after them (the masked mean)."""
    real = mask.astype(bool)
    return np.concatenate([real, np.ones((len(real), 1), bool)], 1) if manifest.summary_row else real


def run_engine(folder: Path, manifest: Manifest, ids: np.ndarray, mask: np.ndarray) -> list[np.ndarray]:
    """Each tap's real tokens decoded with the reference codec, fp32 [tokens, width] in row-major
    order, from one ORT forward."""
    arrays = run_graph(folder, manifest, ids, mask)
    if not manifest.row_input:
        real = mask.astype(bool)
        arrays = [a[real] for a in arrays]
    return [codec.decode_arrays(arrays[2 * i], arrays[2 * i + 1], t.fmt, t.hidden, t.block_size)
            for i, t in enumerate(manifest.taps)]


def fused_mismatches(folder: Path, manifest: Manifest, ids: np.ndarray, mask: np.ndarray) -> tuple[list[int], str]:
    """(taps whose bytes differ between the fused and the standard graph, note). The fused graph
    only runs where this machine's op library loads; the note says when it could not be checked."""
    from mobillm.edge_runtime.session import QuantizerUnavailable

    try:
        fused = run_graph(folder, manifest, ids, mask, "fused")
    except QuantizerUnavailable as exc:
        return [], f"fused graph not checked: {exc}"
    standard = run_graph(folder, manifest, ids, mask)
    bad = [i for i in range(len(manifest.taps))
           if any(fused[k].tobytes() != standard[k].tobytes() for k in (2 * i, 2 * i + 1))]
    return bad, "fused graph: same bytes as the standard graph" if not bad else ""


def reference_taps(manifest: Manifest, ids: np.ndarray, mask: np.ndarray, folder: Path) -> list[np.ndarray]:
    """HF hidden_states[layer] of the fp32 torch model the manifest names, rebuilt from scratch
    (a GGUF engine: from the file's cached conversion, converted again if the cache is gone),
    through transformers' own forward with the plain 2-D attention mask."""
    import torch

    from .calibrate import load_stats
    from .tapped import TapStats, prepare_tap, tap_norms

    model = model_from_manifest(manifest, "fp32")
    stats = TapStats(load_stats(folder)) if manifest.conditioning else None
    with torch.no_grad():
        mask_t = torch.from_numpy(mask)
        out = model(input_ids=torch.from_numpy(ids), attention_mask=mask_t, output_hidden_states=True,
                    use_cache=False)
        norms = tap_norms(model, family_for(model.config.model_type), manifest.tap_layers, manifest.tap_norm)
        return [prepare_tap(out.hidden_states[t.layer], mask_t, manifest.tap_norm, norm, manifest.summary_row,
                            stats, k).float().numpy()
                for k, (t, norm) in enumerate(zip(manifest.taps, norms))]


def relative_rms(err: np.ndarray, ref: np.ndarray) -> float:
    err64, ref64 = err.astype(np.float64), ref.astype(np.float64)
    return float(np.sqrt(np.mean(err64**2) / max(np.mean(ref64**2), 1e-30)))


def channel_error(got: np.ndarray, ref: np.ndarray, spread_of: np.ndarray | None = None) -> float:
    """RMS over channels of each channel's RMS error divided by that channel's spread over the rows
    ([tokens, width] arrays; the spread of `spread_of`, default `ref`: verify passes the unquantized
    reference, since a 4-bit codec zeroes whole channels). A channel with no spread (constant over
    the rows) is measured against the mean spread, so it neither divides by zero nor hides."""
    got64, ref64 = got.astype(np.float64), ref.astype(np.float64)
    spread = (ref64 if spread_of is None else spread_of.astype(np.float64)).std(axis=0)
    spread = np.maximum(spread, 1e-3 * max(float(spread.mean()), 1e-30))
    return float(np.sqrt(np.mean(np.mean((got64 - ref64) ** 2, axis=0) / spread**2)))


def probe_agreement(got: np.ndarray, ref: np.ndarray, probes: int = PROBES, seed: int = 0,
                    stats_of: np.ndarray | None = None) -> float:
    """Share of (row, probe) pairs where random linear probes on the standardized channels (statistics
    of `stats_of`, default `ref`) give the engine's row the sign they give `ref`'s."""
    ref64 = ref.astype(np.float64)
    stats = ref64 if stats_of is None else stats_of.astype(np.float64)
    mean, spread = stats.mean(axis=0), np.maximum(stats.std(axis=0), 1e-12)
    directions = np.random.default_rng(seed).standard_normal((ref.shape[1], probes))
    a = ((got.astype(np.float64) - mean) / spread) @ directions
    b = ((ref64 - mean) / spread) @ directions
    return float(np.mean(np.sign(a) == np.sign(b)))


def verify_engine(folder: Path | str, sentences: list[str] | None = None) -> VerifyReport:
    """Compare every tap of the engine at `folder` with the torch model; see the module docstring."""
    folder = Path(folder)
    manifest = Manifest.load(folder)
    ids, mask = tokenize(folder, manifest, sentences or SENTENCES)
    engine = run_engine(folder, manifest, ids, mask)  # before torch: the two models never share memory
    reference = reference_taps(manifest, ids, mask, folder)
    real = tap_positions(manifest, mask)
    tol = backbone_tolerance(manifest.compute_dtype, manifest.weights)
    checks = []
    for i, (tap, got, ref) in enumerate(zip(manifest.taps, engine, reference)):
        ref_rows, got_rows = ref[real], got
        if got_rows.shape != ref_rows.shape:
            checks.append(TapCheck(i, tap.layer, tap.hidden, tap.fmt, math.nan, math.inf, 0.0,
                                   f"shape {got_rows.shape} != torch {ref_rows.shape}"))
            continue
        codec_err = codec.relative_rms_error(ref_rows, tap.fmt, tap.block_size)
        engine_err = relative_rms(got_rows - ref_rows, ref_rows)
        check = TapCheck(i, tap.layer, tap.hidden, tap.fmt, codec_err, engine_err, MARGIN * codec_err + tol)
        if manifest.weights in CHANNEL_TOLERANCE:
            coded = codec.decode(codec.encode(ref_rows, tap.fmt, tap.block_size))
            check.channel_err = channel_error(got_rows, coded, spread_of=ref_rows)
            check.channel_limit = CHANNEL_TOLERANCE[manifest.weights]
            check.probe_agree = probe_agreement(got_rows, coded, stats_of=ref_rows)
            check.probe_limit = PROBE_AGREEMENT[manifest.weights]
        checks.append(check)
    report = VerifyReport(checks, len(ids), int(real.sum()), tol)
    if manifest.fused_graph:
        bad, report.fused_note = fused_mismatches(folder, manifest, ids, mask)
        for i in bad:
            checks[i].engine_err, checks[i].note = math.inf, "fused graph bytes differ from the standard graph"
    return report
