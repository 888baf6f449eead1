"""One run: a side network, its optimizer, its bounded batch queue and the thread that trains it.

Threads. The server's asyncio loop owns sessions and the receive side (`stream_accepted`,
`stream_ended`, `session`); the run's training thread owns the model and the progress counters
(`step`, `samples_trained`, `stream_trained`, `phase`). The loop hands batches over through
`queue`; the thread reports back with `loop.call_soon_threadsafe` (credits, BITPLAN, wake-ups).

Phases: stream (train batches as they arrive) -> cache (later epochs from the on-disk cache,
`--cache` only) -> export (checkpoint, ONNX, check) -> finished. Any exception: failed.
"""

from __future__ import annotations

import json
import logging
import queue
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from mobillm.common import wire
from mobillm.common.messages import BitPlan, ModelMeta, TapInfo, allowed_formats

from .config import RunConfig, atomic_write
from .core import (METRICS, MODEL_FILE, SUMMARY, Link, TrainingThread, append_record, check_finite,
                   last_epoch_scores, make_optimizer, open_metrics, train_step, write_checkpoint, write_json)
from .data import Rows, TapCache, rows_for_model
from .export import check_onnx, export_onnx
from .model import build_side_network

log = logging.getLogger("mobillm.trainer")

TRAINED_IDS = "trained_ids.jsonl"  # per step: the sample ids trained and their position in the run's order
_END = object()  # queue marker: the device sent DONE
_STOP = object()  # queue marker: the server is stopping


@dataclass
class Item:
    """A validated batch waiting in the queue."""

    batch: wire.Batch
    nbytes: int


class WarmupLinear:
    """Learning-rate factor as a function of samples trained: linear warm-up, then linear decay to 0.

    Counted in samples, not steps, because the device chooses the batch size."""

    def __init__(self, warmup_samples: int, total_samples: int):
        self.warmup, self.total = max(0, warmup_samples), max(1, total_samples)

    def factor(self, samples_done: int) -> float:
        if samples_done < self.warmup:
            return (samples_done + 1) / self.warmup
        return max(0.0, (self.total - samples_done) / max(1, self.total - self.warmup))

    def state_dict(self) -> dict:
        return {"warmup": self.warmup, "total": self.total}

    def load_state_dict(self, state: dict) -> None:
        self.warmup, self.total = int(state["warmup"]), int(state["total"])


class Run(TrainingThread):
    """One device's side network: its queue is the whole schedule (streamed epoch, then the cache)."""

    def __init__(self, cfg: RunConfig, folder: Path, device: str, queue_size: int, checkpoint_every: int,
                 bitplan_every: int, checkpoint: dict | None = None):
        super().__init__(f"train-{cfg.run}", folder)
        self.cfg = cfg
        self.device = torch.device(device)
        self.taps = [TapInfo(**t) for t in cfg.taps]
        self.model = build_side_network(cfg.side, cfg.optim.seed).to(self.device)
        self.optimizer = make_optimizer(self.model, cfg.optim)
        self.schedule = WarmupLinear(round(cfg.optim.warmup_ratio * cfg.total_samples), cfg.total_samples)
        self.queue_size = queue_size
        self.queue: queue.Queue = queue.Queue(maxsize=queue_size + 2)  # + END and STOP markers
        self.checkpoint_every, self.bitplan_every = checkpoint_every, bitplan_every
        # Training-thread state (read elsewhere, written only by the thread after start()).
        self.step = 0
        self.samples_trained = 0
        self.stream_trained = 0
        self.cache_epoch = 1
        self.cache_pos = 0
        self.first_batch_rows = 0
        self.phase = "stream"
        # Loop-thread state.
        self.session: Link | None = None
        self.stream_accepted = 0
        self.stream_ended = False
        self.bytes_received = 0
        label_dtype = wire.LABEL_DTYPES[wire.LABEL_KINDS[cfg.task_type]]
        cache_state = checkpoint.get("cache") if checkpoint else None
        self.cache = None
        if cfg.cache:  # the cache keeps each tap in the one format the device sends it in
            fmts = allowed_formats([t.fmt for t in self.taps], cfg.bits)
            cached = [TapInfo(t.layer, t.hidden, f, t.block_size) for t, f in zip(self.taps, fmts)]
            self.cache = TapCache(self.folder / "cache", cached, label_dtype, cache_state)
        self._wait_s = 0.0
        self._loop_start = time.perf_counter()
        self._last_step_end = self._loop_start
        self._importance = torch.zeros(len(self.taps), device=self.device)
        self._importance_steps = 0
        self._last_epoch = {"loss_sum": 0.0, "rows": 0, "outputs": [], "labels": []}
        self.summary: dict = {}
        if checkpoint is not None:
            self._load(checkpoint)
            for tmp in self.folder.glob(".*.tmp"):  # a crash mid-write leaves its temp file; the real file is whole
                tmp.unlink()
        self.stream_accepted = self.stream_trained
        self.stream_ended = self.phase != "stream"
        self._metrics = open_metrics(self.folder / METRICS, self.step if checkpoint is not None else None)
        self._trained_ids = open_metrics(self.folder / TRAINED_IDS, self.step if checkpoint is not None else None)

    # ---- lifecycle (called from the server) ----

    def stop(self) -> None:
        """Stop training (checkpointing unfinished work) and join the thread. Safe to call twice."""
        self.stop_requested.set()
        if self._thread.is_alive():
            self.queue.put(_STOP)
            self.join()
        self.stopped = True
        self._metrics.close()
        self._trained_ids.close()
        if self.cache is not None:
            self.cache.close()
        self.notify()

    # ---- loop-thread side ----

    def enqueue(self, item: Item) -> None:
        self.queue.put_nowait(item)  # credits bound the queue; Full here is a bug, not a wait

    def end_stream(self) -> None:
        if not self.stream_ended:
            self.stream_ended = True
            self.queue.put_nowait(_END)

    def _grant_credit(self, seq: int, samples_done: int) -> None:
        def send():
            if self.session is not None:
                self.session.grant_credit(seq, samples_done)

        self.deliver(send)

    def _post_bitplan(self, plan: BitPlan) -> None:
        def send():
            if self.session is not None:
                self.session.post_bitplan(plan)

        self.deliver(send)

    @property
    def onnx_path(self) -> Path:
        return self.folder / MODEL_FILE

    def model_meta(self) -> ModelMeta:
        """MODEL frame meta: how to feed the ONNX graph and what it was trained for."""
        return ModelMeta(asdict(self.cfg.side), len(self.taps), self.cfg.task, self.cfg.task_type,
                         self.cfg.num_labels, self.cfg.run, self.cfg.taps, self.summary)

    # ---- training thread ----

    def train_loop(self) -> None:
        while not self.stopped:
            if self.phase == "stream":
                t0 = time.perf_counter()
                item = self.queue.get()
                waited = time.perf_counter() - t0
                if item is _STOP:
                    break
                if item is _END:
                    self._end_of_stream()
                    continue
                self._grant_credit(item.batch.seq, self.stream_trained)
                self._train_streamed(item, waited)
            elif self.phase == "cache":
                if self.stop_requested.is_set():
                    break
                self._train_cached()
            elif self.phase == "export":
                self._finalize()
            else:
                break

    def on_exit(self) -> None:
        if self.phase in ("stream", "cache", "export"):
            self._save_checkpoint()

    def _train_streamed(self, item: Item, waited: float) -> None:
        rows = rows_for_model(item.batch, self.cfg.side.pooling)
        if self.first_batch_rows == 0:
            self.first_batch_rows = len(rows)
        if self.cache is not None:
            self.cache.append(rows)
        self._wait_s += waited
        self._train_step(rows, "stream", waited, item.batch.n_tokens)
        self.stream_trained += len(rows)
        if self.cache is not None and self.stream_trained >= self.cfg.samples_per_epoch:
            self._start_cached_epochs()
        self._after_step()

    def _end_of_stream(self) -> None:
        if self.cache is not None:
            self._start_cached_epochs()
        else:
            self.phase = "export"
        self.notify()

    def _start_cached_epochs(self) -> None:
        self.phase = "cache" if self.cfg.epochs > 1 and len(self.cache) else "export"
        log.info("run %s: %d samples cached; %s", self.cfg.run, len(self.cache),
                 f"training {self.cfg.epochs - 1} more epochs from the cache" if self.phase == "cache" else "exporting")

    def _cache_order(self, epoch: int) -> np.ndarray:
        if getattr(self, "_order_epoch", None) != epoch:
            self._order = np.random.default_rng([self.cfg.optim.seed, epoch]).permutation(len(self.cache))
            self._order_epoch = epoch
        return self._order

    def _train_cached(self) -> None:
        size = self.cfg.optim.cache_batch_size or self.first_batch_rows or 32
        entries = self._cache_order(self.cache_epoch)[self.cache_pos:self.cache_pos + size]
        rows = self.cache.gather(entries)
        self._train_step(rows, "cache", 0.0, int(rows.lengths.sum()))
        self.cache_pos += len(entries)
        if self.cache_pos >= len(self.cache):
            self.cache_epoch, self.cache_pos = self.cache_epoch + 1, 0
            if self.cache_epoch >= self.cfg.epochs:
                self.phase = "export"
        self._after_step()

    def _train_step(self, rows: Rows, source: str, waited: float, tokens: int) -> None:
        t0 = time.perf_counter()
        cfg = self.cfg
        want_importance = self.bitplan_every > 0
        lr = cfg.optim.lr * self.schedule.factor(self.samples_trained)
        step = train_step(self.model, self.optimizer, rows, self.taps, cfg.task_type, self.device, lambda _: lr,
                          cfg.optim.grad_clip, want_importance)
        if want_importance:
            # Per tap: RMS of d loss / d (dequantized activation), a proxy for how much that tap's
            # quantization error matters; the device may spend bits where it is largest.
            self._importance += torch.stack([t.grad.pow(2).mean().sqrt() for t in step.inputs]).detach()
            self._importance_steps += 1
        loss_value, grad_norm, logits = step.loss, step.grad_norm, step.logits
        n = len(rows)
        self.step += 1
        self.samples_trained += n
        if self.samples_trained > self.cfg.total_samples - self.cfg.samples_per_epoch:
            self._last_epoch["loss_sum"] += loss_value * n
            self._last_epoch["rows"] += n
            self._last_epoch["outputs"].append(logits.detach().float().cpu().numpy())
            self._last_epoch["labels"].append(rows.labels)
        now = time.perf_counter()
        elapsed = now - self._loop_start
        record = {
            "step": self.step, "samples": self.samples_trained, "epoch": self.samples_trained / cfg.samples_per_epoch,
            "source": source, "loss": loss_value, "lr": lr, "grad_norm": grad_norm, "rows": n, "tokens": tokens,
            "samples_per_s": n / max(now - self._last_step_end, 1e-9), "step_s": now - t0, "wait_s": waited,
            "idle_frac": self._wait_s / max(elapsed, 1e-9), "bytes_received": self.bytes_received,
            "queue_depth": self.queue.qsize(), "time": time.time(),
        }
        self._last_step_end = now
        append_record(self._metrics, record)
        # Which samples this step trained; `first` is their position in the run's order (all epochs back
        # to back), so row i belongs to epoch (first + i) // samples_per_epoch. See read_trained_ids.
        append_record(self._trained_ids, {"step": self.step, "first": self.samples_trained - n,
                                          "ids": rows.sample_ids.tolist()})
        check_finite(loss_value, self.step)

    def _after_step(self) -> None:
        if self.step % self.checkpoint_every == 0:
            self._save_checkpoint()
        if self.bitplan_every and self.step % self.bitplan_every == 0 and self._importance_steps:
            importance = (self._importance / self._importance_steps).tolist()
            self._importance.zero_()
            self._importance_steps = 0
            self._post_bitplan(BitPlan(importance, self.step))
        self.notify()

    def _finalize(self) -> None:
        """Final checkpoint, ONNX export checked against torch, summary; then `finished`."""
        self._save_checkpoint()
        onnx_bytes = export_onnx(self.model)
        diff = check_onnx(onnx_bytes, self.model)
        atomic_write(self.onnx_path, onnx_bytes)
        self.summary = self._summarize(diff)
        write_json(self.folder / SUMMARY, self.summary)
        self.phase = "finished"
        self._save_checkpoint()
        log.info("run %s finished: %s", self.cfg.run, self.summary)

    def _summarize(self, onnx_diff: float) -> dict:
        last = self._last_epoch
        summary = {"samples_trained": self.samples_trained, "steps": self.step, "onnx_max_abs_diff": onnx_diff,
                   "train_idle_frac": self._wait_s / max(time.perf_counter() - self._loop_start, 1e-9)}
        if last["rows"]:
            summary["last_epoch_loss"] = last["loss_sum"] / last["rows"]
            outputs, labels = np.concatenate(last["outputs"]), np.concatenate(last["labels"])
            summary.update(last_epoch_scores(self.cfg.task, self.cfg.task_type, self.cfg.num_labels, outputs, labels))
        return summary

    # ---- checkpoints ----

    def _save_checkpoint(self) -> None:
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "progress": {"step": self.step, "samples_trained": self.samples_trained,
                         "stream_trained": self.stream_trained, "cache_epoch": self.cache_epoch,
                         "cache_pos": self.cache_pos, "first_batch_rows": self.first_batch_rows,
                         "phase": self.phase},
            "rng": {"torch": torch.get_rng_state()},
            "cache": self.cache.state() if self.cache is not None else None,
            "summary": self.summary,
            "last_epoch": self._last_epoch_state(),
        }
        if self.device.type == "cuda":
            state["rng"]["cuda"] = torch.cuda.get_rng_state(self.device)
        write_checkpoint(self.folder, state)

    def _last_epoch_state(self) -> dict | None:
        """The last epoch's outputs so far, so a run resumed inside its last epoch reports the same metric."""
        last = self._last_epoch
        if not last["rows"]:
            return None
        last["outputs"], last["labels"] = [np.concatenate(last["outputs"])], [np.concatenate(last["labels"])]
        return {"loss_sum": last["loss_sum"], "rows": last["rows"], "outputs": torch.from_numpy(last["outputs"][0]),
                "labels": torch.from_numpy(last["labels"][0])}

    def _load(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        p = state["progress"]
        self.step, self.samples_trained, self.stream_trained = p["step"], p["samples_trained"], p["stream_trained"]
        self.cache_epoch, self.cache_pos = p["cache_epoch"], p["cache_pos"]
        self.first_batch_rows = p["first_batch_rows"]
        self.phase = p["phase"]
        self.summary = state.get("summary") or {}
        last = state.get("last_epoch")
        if last:
            self._last_epoch = {"loss_sum": float(last["loss_sum"]), "rows": int(last["rows"]),
                                "outputs": [last["outputs"].numpy()], "labels": [last["labels"].numpy()]}
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        if self.phase == "finished" and not self.onnx_path.is_file():
            self.phase = "export"  # the ONNX file went missing: make it again


def read_trained_ids(folder: Path | str) -> dict[int, list[int]]:
    """{epoch: sample ids trained in that epoch, in training order} from a run's trained_ids.jsonl.

    It holds exactly the steps the run's model has seen: a resumed run cuts the steps after its
    checkpoint before training them again. A sample trained exactly once per epoch appears once
    in each epoch's list."""
    folder = Path(folder)
    per_epoch = RunConfig.load(folder).samples_per_epoch
    out: dict[int, list[int]] = {}
    lines = (folder / TRAINED_IDS).read_text().splitlines()
    for n, line in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines) - 1:
                break  # torn by a kill mid-write, before a resume could cut it
            raise
        for i, sid in enumerate(record["ids"]):
            out.setdefault((record["first"] + i) // per_epoch, []).append(sid)
    return out

