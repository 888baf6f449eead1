"""Calibration for `--tap-norm channel`: each tap's per-channel mean and spread on a few hundred rows.

Gemma 3's residual stream carries a few channels 1e3-1e4 times larger than the rest, even after the
per-token RMS norm (../shared/notes/gemma-3-270m.md). A 4-bit block's absmax scale is then set by
one such channel and most ordinary values in that block round to zero (32-69 % of the nf4 values
the server decoded at the last token). Standardizing every channel before the quantizer removes
that: the statistics are measured here, folded into the traced graph (export/tapped.py
`prepare_tap`) and saved beside it, so the device stays a plain forward pass. The statistics come
from calibration text only (built-in sentences or `--calibration FILE`), never from a dev set.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from .options import ExportError

STATS_NAME = "tap_stats.npz"
BUILTIN = Path(__file__).with_name("calibration.txt")
TEXT_COLUMNS = ("sentence", "text", "sentence1", "question", "premise")


def calibration_texts(path: Path | None, columns: str | None, rows: int) -> tuple[list[str], dict]:
    """Up to `rows` non-empty texts and a record of where they came from; ExportError (exit 2) names
    a file that is missing, empty or lacks the text columns."""
    if path is None:
        texts = [t.strip() for t in BUILTIN.read_text(encoding="utf-8").splitlines() if t.strip()]
        return texts[:rows], {"calibration": "built-in", "sha256": _sha256(BUILTIN)}
    path = Path(path)
    if not path.exists():
        raise ExportError(f"--calibration {path}: no such file or folder")
    if path.suffix.lower() == ".txt":
        texts = [t.strip() for t in path.read_text(encoding="utf-8", errors="replace").splitlines() if t.strip()]
    else:
        texts = _texts_from_records(path, columns)
    texts = [t for t in texts if t]
    if not texts:
        raise ExportError(f"--calibration {path}: no text rows found; give a file with text in "
                          f"{columns or ' or '.join(TEXT_COLUMNS)}")
    return texts[:rows], {"calibration": path.name, "sha256": _sha256(path) if path.is_file() else None}


def _texts_from_records(path: Path, columns: str | None) -> list[str]:
    from mobillm.common.errors import BadInput
    from mobillm.common.tasks import Task
    from mobillm.edge_runtime.data import load_examples

    def read(cols: tuple[str, ...]) -> list[str]:
        task = Task("calibration", "class", 2, cols, "__no_label__", "accuracy")
        return [" ".join(e.texts) for e in load_examples(path, task, require_labels=False)]

    if columns:
        try:
            return read(tuple(c.strip() for c in columns.split(",")))
        except BadInput as exc:
            raise ExportError(f"--calibration {path}: {exc}") from None
    last = None
    for col in TEXT_COLUMNS:
        try:
            return read((col,))
        except BadInput as exc:
            last = exc
    raise ExportError(f"--calibration {path}: none of the columns {', '.join(TEXT_COLUMNS)} found ({last}); "
                      f"name the text columns with --calibration-cols")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def measure_stats(wrapper, rows: list[list[int]], pad_id: int, batch_size: int = 16) -> dict[str, np.ndarray]:
    """Per tap: mean and spread of every channel over the real tokens (`token`) and over the rows'
    masked means (`summary`) of `wrapper` (a TappedDecoder with summary_row and no stats), float32."""
    import torch

    if not rows:
        raise ExportError("calibration: no rows to measure the taps on")
    sums: dict[str, list] = {}
    counts = {"token": 0, "summary": 0}
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            width = max(len(r) for r in chunk)
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, r in enumerate(chunk):
                ids[i, :len(r)] = torch.tensor(r)
                mask[i, :len(r)] = 1
            taps = wrapper(ids, mask)
            real = mask.bool()
            counts["token"] += int(real.sum())
            counts["summary"] += len(chunk)
            for k, tap in enumerate(taps):
                t = tap.double()
                for which, values in (("token", t[:, :width][real]), ("summary", t[:, width])):
                    acc = sums.setdefault(f"tap{k}_{which}", [0.0, 0.0])
                    acc[0] = acc[0] + values.sum(0)
                    acc[1] = acc[1] + (values ** 2).sum(0)
    out = {}
    for key, (s1, s2) in sums.items():
        n = counts[key.split("_")[1]]
        mean = s1 / n
        std = torch.sqrt(torch.clamp(s2 / n - mean ** 2, min=0.0))
        # A channel that never moves would be divided by ~0: floor each spread at 1e-3 of the median.
        std = torch.clamp(std, min=float(std.median()) * 1e-3 + 1e-6)
        out[f"{key}_mean"], out[f"{key}_std"] = mean.float().numpy(), std.float().numpy()
    bad = [k for k, v in out.items() if not np.isfinite(v).all()]
    if bad:
        raise ExportError(f"calibration produced non-finite statistics ({', '.join(bad[:4])}); the calibration "
                          f"rows are empty, all padding or make the model overflow: give other --calibration text")
    return out


def save_stats(stats: dict[str, np.ndarray], folder: Path) -> str:
    """Write the statistics beside the graph; returns their sha256 (the taps' conditioning identity)."""
    path = folder / STATS_NAME
    np.savez(path, **stats)
    return _sha256(path)


def load_stats(folder: Path) -> dict[str, np.ndarray]:
    with np.load(Path(folder) / STATS_NAME) as z:
        return {k: z[k] for k in z.files}
