"""eps(Q) for the bit planner, measured on the engine's own taps instead of Gaussian data.

A few dozen rows of the device's data go through the backbone once; each tap's fp16 values are
encoded with every format of the ladder (kernels/codec.py, the same bytes the graph produces)
and the relative MSE ||decode(encode(x)) - x||^2 / ||x||^2 is kept per tap and format. The
table is cached as ENGINE/distortion.json, keyed by the engine (manifest sha256), the block
size and the formats; a stale or missing file is recomputed. A read-only engine folder never
fails the run: the table then lives in memory for this run only (with a one-line notice).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from mobillm.common.manifest import manifest_digest
from mobillm.kernels import codec

from .backbone import Backbone
from .bitplan import RULES, BitPlanner, gaussian_table

log = logging.getLogger("mobillm.edge")

CACHE_NAME = "distortion.json"
CALIBRATION_ROWS = 32


def reference_taps(bb: Backbone, rows: list[np.ndarray]) -> list[np.ndarray] | None:
    """Each tap's real tokens as fp32 [tokens, hidden], from the graph's fp16 output (the engine's own
    fp16 taps, or fp16 through the format switch); None when the engine emits no fp16 taps."""
    m = bb.manifest
    if "fp16" in m.switch_formats:
        taps, _ = bb.forward(rows, keep="tokens", formats=["fp16"] * len(m.taps))
    elif all(t.fmt == "fp16" for t in m.taps):
        taps, _ = bb.forward(rows, keep="tokens")
    else:
        return None
    return [codec.decode_arrays(t.codes, t.scales, "fp16", t.spec.hidden, t.spec.block_size) for t in taps]


def measure(reference: list[np.ndarray], formats: tuple[str, ...], block_size: int) -> list[dict[str, float]]:
    """Relative MSE per tap and format of the reference codec on `reference` (fp16 against itself: 0)."""
    return [{f: codec.relative_rms_error(x, f, block_size) ** 2 for f in formats} for x in reference]


def cache_key(bb: Backbone, formats: tuple[str, ...]) -> dict:
    return {"engine": manifest_digest(bb.folder), "block_size": bb.manifest.taps[0].block_size,
            "formats": list(formats)}


def load_or_measure(bb: Backbone, rows: list[np.ndarray], formats: tuple[str, ...]) -> tuple[list[dict], str]:
    """eps per tap and format, and where it came from: "cache", "measured" (and cached), "measured,
    not cached" (read-only folder) or "gaussian" (the engine has no fp16 taps to measure against)."""
    key = cache_key(bb, formats)
    path = Path(bb.folder) / CACHE_NAME
    try:
        cached = json.loads(path.read_text())
        if cached.get("key") == key and len(cached.get("eps", ())) == len(bb.manifest.taps):
            return cached["eps"], "cache"
    except (OSError, ValueError):
        pass  # absent or unreadable: measure again
    reference = reference_taps(bb, rows[:CALIBRATION_ROWS])
    if reference is None:
        log.warning("bit planner: the engine emits no fp16 taps to calibrate against (export with --quant fp16 "
                    "or --tap-formats ...,fp16); using eps measured on Gaussian data")
        return gaussian_table(len(bb.manifest.taps), key["block_size"], formats), "gaussian"
    eps = measure(reference, formats, key["block_size"])
    record = {"key": key, "rows": min(len(rows), CALIBRATION_ROWS),
              "tokens": int(reference[0].shape[0]), "eps": eps}
    tmp = path.with_suffix(".json.part")
    try:
        tmp.write_text(json.dumps(record, indent=1))
        tmp.replace(path)
    except OSError as exc:
        log.warning("bit planner: cannot cache the calibration in %s (%s); keeping it in memory for this run",
                    path, exc.strerror or exc)
        return eps, "measured, not cached"
    return eps, "measured"


def make_planner(bb: Backbone, rows: list[np.ndarray], rule: str, latency_target_s: float) -> tuple[BitPlanner, bool]:
    """The planner of `--bits auto:RULE` for this engine, with eps measured on `rows`, and whether the
    graph switches formats itself (else the device re-quantizes the engine's output in numpy)."""
    ladder = RULES[rule]
    eps, source = load_or_measure(bb, rows, ladder)
    specs = bb.manifest.taps
    in_graph = set(ladder) <= set(bb.manifest.switch_formats)
    log.info("bit planner: rule %s, formats %s, eps %s", rule, ",".join(ladder), source)
    if not in_graph:
        log.warning("bit planner: this engine cannot switch tap formats in the graph; re-quantizing its %s "
                    "output in numpy (export with --quant fp16 --tap-formats %s to avoid it)",
                    ",".join(sorted({t.fmt for t in specs})), ",".join(ladder))
    return BitPlanner([t.hidden for t in specs], specs[0].block_size, latency_target_s, rule=rule, eps=eps), in_graph
