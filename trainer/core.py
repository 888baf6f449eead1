"""The training core's units: one optimizer step, the metric of the last epoch, the checkpoint
writer, the per-step logs, and the typed link back to a device's session.

The one training loop that uses them is `training.TrainingRun`; its strategies (`run.SingleDevice`,
`federated.Federated`) differ only in what they schedule, train and save. A run's training thread
never calls a session directly: it hands `deliver` a closure that runs on the server's event loop,
against the `Link` interface a session implements.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch

from mobillm.common import tasks
from mobillm.common.messages import BitPlan, TapInfo

from .config import atomic_write
from .data import Rows, decode_rows
from .model import SideNetwork, task_loss

log = logging.getLogger("mobillm.trainer")

CHECKPOINT = "checkpoint.pt"
MODEL_FILE = "side_network.onnx"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"


class Link(Protocol):
    """What a training thread may tell a device's session (called on the server's event loop)."""

    def grant_credit(self, seq: int, samples_done: int) -> None:
        """Batch `seq` left the queue: one more credit, and the device's resume point."""

    def post_bitplan(self, plan: BitPlan) -> None:
        """Per-tap importance, so the device may spend its bits where they matter."""


def make_optimizer(model: torch.nn.Module, o) -> torch.optim.AdamW:
    """AdamW, fused (one kernel for all parameters) where this torch supports it on the model's device."""
    options = dict(lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
    try:
        return torch.optim.AdamW(model.parameters(), fused=True, **options)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(model.parameters(), **options)


def step_loss(model: SideNetwork, rows: Rows, taps: list[TapInfo], task_type: str, device: torch.device,
              input_grads: bool = False) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """(loss, logits, dequantized tap rows) for one batch of rows; the tap rows keep grads if asked."""
    inputs = decode_rows(rows, taps, device)
    if input_grads:
        for t in inputs:
            t.requires_grad_(True)
    lengths = torch.from_numpy(rows.lengths).to(device)
    labels = torch.from_numpy(rows.labels).to(device)
    logits = model.logits_from_rows(inputs, lengths)
    return task_loss(logits, labels, task_type), logits, inputs


@dataclass
class Step:
    """What one optimizer step measured."""

    loss: float
    grad_norm: float
    logits: torch.Tensor
    inputs: list[torch.Tensor]  # dequantized taps; they carry grads when asked for


def train_step(model: SideNetwork, optimizer: torch.optim.Optimizer, rows: Rows, taps: list[TapInfo],
               task_type: str, device: torch.device, lr_of: Callable[[dict], float], grad_clip: float,
               input_grads: bool = False) -> Step:
    """Decode, loss, backward, clip, AdamW step. `lr_of(group)` sets each param group's learning rate;
    `grad_clip` 0 disables clipping. Loss and grad norm come back in one device sync."""
    model.train()
    loss, logits, inputs = step_loss(model, rows, taps, task_type, device, input_grads)
    for group in optimizer.param_groups:
        group["lr"] = lr_of(group)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else math.inf)
    optimizer.step()
    loss_value, norm = torch.stack([loss.detach(), grad_norm.detach()]).tolist()
    return Step(loss_value, norm, logits, inputs)


def check_finite(loss: float, step: int, where: str = "") -> None:
    """A non-finite loss fails the run: later steps would only spread NaN through the weights."""
    if not math.isfinite(loss):
        raise FloatingPointError(f"loss became {loss} at step {step}{where}; lower --lr or check the taps")


def last_epoch_scores(task: str, task_type: str, num_labels: int, outputs: np.ndarray, labels: np.ndarray) -> dict:
    """`last_epoch_<metric>` for a task: its preset's metric when the kind matches, else accuracy
    (classification) or Pearson (regression)."""
    preset = tasks.TASKS.get(task)
    metric = preset.metric if preset and preset.kind == task_type else (
        "pearson" if task_type == "regression" else "accuracy")
    scored = tasks.score(tasks.Task(task, task_type, num_labels, (), "", metric), outputs, labels)
    return {f"last_epoch_{k}": v for k, v in scored.items()}


def write_checkpoint(folder: Path, state: dict, name: str = CHECKPOINT) -> None:
    """torch.save via a fsynced temp file and a rename: a crash leaves the old checkpoint or the new one."""
    folder = Path(folder)
    tmp = folder / f".{name}.tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(folder / name)


def load_checkpoint(folder: Path | str, map_location: str = "cpu", mmap: bool = False) -> dict:
    """A run's checkpoint (tensors only, weights_only). Runs load it on the CPU and move the model
    and optimizer state to their device as they load them; `mmap` reads tensors only when touched
    (to look at its progress without loading the weights)."""
    return torch.load(Path(folder) / CHECKPOINT, map_location=map_location, weights_only=True, mmap=mmap)


def write_json(path: Path, data: dict) -> None:
    """A summary or config file, atomically, indented for people."""
    atomic_write(path, (json.dumps(data, indent=2) + "\n").encode())


def open_metrics(path: Path, keep_steps: int | None):
    """A per-step JSONL log (metrics.jsonl, trained_ids.jsonl) for appending. On resume, steps after
    the checkpoint (trained again now) are cut, and so is a half-written last line (a killed process)."""
    if keep_steps is None or not path.is_file():
        return open(path, "w")
    kept = []
    for line in path.read_text().splitlines():
        try:
            step = json.loads(line)["step"]
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # torn by a crash mid-write: never a step the checkpoint knows
        if step <= keep_steps:
            kept.append(line)
    atomic_write(path, "".join(line + "\n" for line in kept).encode())
    return open(path, "a")


def append_record(log_file, record: dict) -> None:
    """One JSONL line, flushed: a crash loses at most the step in progress."""
    log_file.write(json.dumps(record) + "\n")
    log_file.flush()
