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
from mobillm.common.messages import BitPlan
from mobillm.common.taps import TapSpec

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


def resolve_precision(precision: str, device: str) -> tuple[str, str | None]:
    """The precision a server on `device` can train in, and one line saying why when it is not
    the one asked for (fp16 autocast needs CUDA; bf16 needs a GPU that has it). Called before a
    run starts, so an impossible precision never fails a run mid-way."""
    kind = torch.device(device).type
    if precision == "fp16" and kind != "cuda":
        return "fp32", f"fp16 training needs a CUDA server; --device {device} trains in fp32 instead"
    if precision == "bf16" and kind == "cuda" and not torch.cuda.is_bf16_supported():
        return "fp32", f"this GPU has no bf16; --device {device} trains in fp32 instead"
    return precision, None


class MixedPrecision:
    """Autocast and (fp16 only) a GradScaler for one run's steps; fp32 turns both off, leaving the
    step exactly as without them."""

    DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}

    def __init__(self, precision: str, device: torch.device):
        self.precision, note = resolve_precision(precision, str(device))
        if note:
            log.warning(note)
        self.device_type = torch.device(device).type
        self.dtype = self.DTYPES.get(self.precision)
        self.scaler = torch.amp.GradScaler(self.device_type, enabled=self.precision == "fp16")

    def autocast(self):
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.dtype is not None)

    def save_to(self, state: dict) -> dict:
        """A checkpoint `state` with the loss scale added (fp16 only: other checkpoints keep their layout)."""
        if self.scaler.is_enabled():
            state["scaler"] = self.scaler.state_dict()
        return state

    def load_from(self, state: dict) -> None:
        if self.scaler.is_enabled() and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])


def step_loss(model: SideNetwork, rows: Rows, taps: list[TapSpec], task_type: str, device: torch.device,
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


def train_step(model: SideNetwork, optimizer: torch.optim.Optimizer, rows: Rows, taps: list[TapSpec],
               task_type: str, device: torch.device, lr_of: Callable[[dict], float], grad_clip: float,
               input_grads: bool = False, amp: MixedPrecision | None = None) -> Step:
    """Decode, loss, backward, clip, AdamW step. `lr_of(group)` sets each param group's learning rate;
    `grad_clip` 0 disables clipping; `amp` (default fp32) runs the forward under autocast (fp16: with
    loss scaling, gradients unscaled before clipping, a step with inf/NaN gradients skipped).
    Loss and grad norm come back in one device sync."""
    amp = amp or MixedPrecision("fp32", device)
    model.train()
    with amp.autocast():
        loss, logits, inputs = step_loss(model, rows, taps, task_type, device, input_grads)
    optimizer.zero_grad(set_to_none=True)
    amp.scaler.scale(loss).backward()
    if input_grads and amp.scaler.is_enabled():  # unscale_ unscales the parameters' grads only
        for t in inputs:  # an overflowing step (skipped below) adds nothing to the per-tap importance
            torch.nan_to_num_(t.grad.mul_(1.0 / amp.scaler.get_scale()), nan=0.0, posinf=0.0, neginf=0.0)
    grad_norm = apply_gradients(optimizer, model.parameters(), lr_of, grad_clip, amp)
    loss_value, norm = torch.stack([loss.detach().float(), grad_norm.detach().float()]).tolist()
    return Step(loss_value, norm, logits.float(), inputs)


def apply_gradients(optimizer: torch.optim.Optimizer, params, lr_of: Callable[[dict], float], grad_clip: float,
                    amp: MixedPrecision) -> torch.Tensor:
    """The optimizer half of a step, once for every kind of step (`train_step`; a world's step sums the
    gradients over its ranks first, `world_fed.shared_step`): each group's learning rate, the
    gradients unscaled (fp16), `params`' clipped to `grad_clip` (0: not clipped), the AdamW step.
    Returns the norm before clipping."""
    for group in optimizer.param_groups:
        group["lr"] = lr_of(group)
    amp.scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else math.inf)
    amp.scaler.step(optimizer)
    amp.scaler.update()
    return grad_norm


def check_finite(loss: float, step: int, where: str = "") -> None:
    """A non-finite loss fails the run: later steps would only spread NaN through the weights."""
    if not math.isfinite(loss):
        raise FloatingPointError(f"loss became {loss} at step {step}{where}; lower --lr or check the taps")


def scored_task(task: str, task_type: str, num_labels: int) -> tasks.Task:
    """The task as runs score it: its preset's metric (and extra metrics) when the kind matches, else
    accuracy (classification) or Pearson (regression)."""
    preset = tasks.TASKS.get(task)
    if preset and preset.kind == task_type:
        return tasks.Task(task, task_type, num_labels, (), "", preset.metric, extra_metrics=preset.extra_metrics)
    return tasks.Task(task, task_type, num_labels, (), "", "pearson" if task_type == "regression" else "accuracy")


def last_epoch_scores(task: str, task_type: str, num_labels: int, outputs: np.ndarray, labels: np.ndarray) -> dict:
    """`last_epoch_<metric>` for a task (`scored_task`'s metrics)."""
    scored = tasks.score(scored_task(task, task_type, num_labels), outputs, labels)
    return {f"last_epoch_{k}": v for k, v in scored.items()}


class WarmupLinear:
    """Learning-rate factor as a function of samples trained: linear warm-up, then linear decay to 0.

    Counted in samples, not steps, because the device chooses the batch size."""

    def __init__(self, warmup_samples: int, total_samples: int, start: int = 0):
        self.warmup, self.total, self.start = max(0, warmup_samples), max(1, total_samples), start

    def factor(self, samples_done: int) -> float:
        """The factor `samples_done` samples into the run (the schedule begins at sample `start`)."""
        samples_done -= self.start
        if samples_done < self.warmup:
            return (samples_done + 1) / self.warmup
        return max(0.0, (self.total - samples_done) / max(1, self.total - self.warmup))

    def state_dict(self) -> dict:
        return {"warmup": self.warmup, "total": self.total, "start": self.start}

    def load_state_dict(self, state: dict) -> None:
        self.warmup, self.total, self.start = int(state["warmup"]), int(state["total"]), int(state.get("start", 0))


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
