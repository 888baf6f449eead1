"""`trainer plot RUN`: loss curves from RUN/metrics.jsonl into a PNG (matplotlib, Agg, no display)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .config import RunFolderError


def read_metrics(folder: Path | str) -> list[dict]:
    path = Path(folder) / "metrics.jsonl"
    if not path.is_file():
        raise RunFolderError(f"{path} not found; has the run trained any step yet?")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average (the first points average what exists so far)."""
    cumsum = np.cumsum(np.insert(values, 0, 0.0))
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(0, idx - window)
    return (cumsum[idx] - cumsum[lo]) / (idx - lo)


def plot_run(folder: Path | str, out: Path | str | None = None) -> Path:
    """Loss per step (raw and smoothed) against epochs, with the learning rate; returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    records = read_metrics(folder)
    if not records:
        raise RunFolderError(f"{folder}/metrics.jsonl holds no steps yet")
    epoch = np.array([r["epoch"] for r in records])
    loss = np.array([r["loss"] for r in records])
    lr = np.array([r["lr"] for r in records])
    cached = np.array([r["source"] == "cache" for r in records])
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    ax.plot(epoch, loss, color="tab:blue", alpha=0.25, lw=0.8, label="loss (per step)")
    ax.plot(epoch, smooth(loss, max(1, len(loss) // 50)), color="tab:blue", lw=2, label="loss (smoothed)")
    if cached.any():
        ax.axvspan(epoch[cached].min(), epoch[cached].max(), color="tab:green", alpha=0.08, label="from cache")
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss")
    ax.set_title(folder.name)
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(epoch, lr, color="tab:orange", lw=1, label="learning rate")
    ax2.set_ylabel("learning rate")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="upper right")
    fig.tight_layout()
    out = Path(out) if out else folder / "loss.png"
    fig.savefig(out)
    plt.close(fig)
    return out
