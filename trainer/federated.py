"""Federated side-tuning (`trainer serve --federated`): many devices and backbones, one side network per task.

Devices speak the ordinary protocol (`docs/protocol.md`); what changes is on the server:

- One `FedRun` per task (run `fed-<task>`, or the HELLO's `run`) for every device that sends that
  task, whatever its backbone. Several devices stream into it at once, each with its own credits
  (`--queue`) and its own FIFO of received batches.
- A family (engine) seen for the first time gets an `Alignment` (`fed_model.py`): per-tap LayerNorm +
  projection to the shared width, slots chosen by relative depth. Its parameters join the optimizer
  and train jointly with the shared adapters and head.
- One training thread drains the FIFOs: it takes the head batch of the device with the smallest
  share of the last `share_window` trained samples. It never waits while any FIFO holds a batch, so
  a fast device is not held back by a slow one; with `--max-share` a device above that share waits
  while another connected device that still streams is below it.
- DONE from a device: its FIFO is trained, then it receives the current shared body + its family's
  alignment as one ONNX graph with the ordinary side-network contract. Training goes on for the others.

The message loop is the server's (`server.py`); `policy.FederatedPolicy` opens these runs.
Threads, as in `run.py`: the asyncio loop owns sessions; the training thread owns the model and
optimizer; `cond` guards the device table and FIFOs; `model_lock` covers each optimizer step, each
new family and each snapshot taken for export.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import logging
import math
import threading
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mobillm.common import wire
from mobillm.common.messages import FedModel, Hello, ModelMeta, ProtocolError

from .config import ServerConfig, atomic_write
from .core import (METRICS, MODEL_FILE, SUMMARY, Link, TrainingThread, append_record, check_finite,
                   last_epoch_scores, make_optimizer, open_metrics, train_step, write_checkpoint, write_json)
from .data import rows_for_model
from .export import check_onnx, export_onnx
from .fed_model import AlignedSide, Alignment, Family, FedSideModel, SharedSide
from .protocol import accept_batch

log = logging.getLogger("mobillm.trainer")

CONFIG = "fed_config.json"
ALIGNED = "aligned.pt"


@dataclass
class FedItem:
    """A validated batch in one device's FIFO."""

    batch: wire.Batch
    nbytes: int
    session: Link  # the session that received it: its credit goes back there
    arrived_step: int  # global optimizer step when it arrived (staleness = steps it waited)


@dataclass
class Device:
    """One device of a federated run. FIFO and counters are guarded by the run's `cond`."""

    device_id: str
    hello: Hello
    family: str
    session: Any = None
    queue: deque = field(default_factory=deque)
    accepted: int = 0  # samples received (and queued or trained) from the device's stream
    trained: int = 0  # samples of the device's stream trained: its resume point
    in_step: bool = False
    done: bool = False  # DONE received on the current connection
    last_step: int | None = None
    bytes_received: int = 0
    batches: int = 0
    staleness_sum: int = 0
    staleness_max: int = 0
    recent: deque = field(default_factory=deque)  # (loss * rows, rows, logits, labels) of its last epoch
    recent_rows: int = 0

    @property
    def total(self) -> int:
        return self.hello.epochs * self.hello.samples_per_epoch

    @property
    def taps(self) -> list:
        return list(self.hello.taps)

    @property
    def streaming(self) -> bool:
        """Connected and still owes batches: the max-share rule may wait for it."""
        return self.session is not None and not self.done and self.accepted < self.total

    def identity(self) -> dict:
        return dict(self.hello.identity(), num_layers=self.hello.num_layers)


def lr_factor(samples: int, warmup: int) -> float:
    """Linear warm-up, then inverse square root decay: devices join and leave at any time, so there is
    no known end to decay towards. The shared body counts every sample; a family's alignment counts its
    own, so a backbone that joins late still starts at the full learning rate."""
    if samples < warmup:
        return (samples + 1) / warmup
    return math.sqrt(max(warmup, 1) / max(samples, 1))


def family_of(hello: Hello) -> Family:
    """The HELLO's backbone family. Without `num_layers` the deepest tap is the last layer (the manifest
    always taps the final layer)."""
    depth = hello.num_layers or max(t.layer for t in hello.taps)
    return Family(hello.manifest_sha256, hello.model_id, depth, tuple((t.layer, t.hidden) for t in hello.taps))


class FedRun(TrainingThread):
    """One shared side network, the devices feeding it, and the thread that trains it."""

    def __init__(self, name: str, folder: Path, config: ServerConfig, hello: Hello, checkpoint: dict | None = None):
        super().__init__(f"fed-{name}", folder)
        self.name, self.config = name, config
        self.fed, self.optim = config.fed, config.optim
        self.task = {"task": hello.task, "task_type": hello.task_type, "num_labels": hello.num_labels}
        self.device = torch.device(config.device)
        side = dataclasses.replace(config.side, tap_widths=[], out_dim=hello.out_dim, side_width=self.fed.width)
        self.model = FedSideModel(side, self.fed.slots, self.optim.seed).to(self.device)
        self.optimizer = make_optimizer(self.model.shared, self.optim)  # one param group more per family
        self.views: dict[str, AlignedSide] = {}
        self.devices: dict[str, Device] = {}
        self.cond = threading.Condition()
        self.model_lock = threading.Lock()
        self._summary_lock = threading.Lock()
        self.step = 0
        self.samples_trained = 0
        self.family_samples: Counter = Counter()  # samples trained per backbone family (its alignment's lr)
        self.bytes_received = 0
        self.window: deque[tuple[str, int]] = deque()  # (device, rows) of the last share_window samples
        self.window_counts: Counter = Counter()
        self.window_total = 0
        self.phase = "train"
        self._resumed: dict[str, dict] = {}  # device progress from a checkpoint, until the device reconnects
        self._wait_s = 0.0
        self._t0 = time.perf_counter()
        if checkpoint is not None:
            self._load(checkpoint)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._save_config()
        self._metrics = open_metrics(self.folder / METRICS, self.step if checkpoint is not None else None)

    # ---- lifecycle ----

    def stop(self) -> None:
        """Stop training, checkpoint, join the thread. Safe to call twice."""
        with self.cond:
            self.stop_requested.set()
            self.cond.notify_all()
        self.join()
        if not self.stopped:
            self.stopped = True
            self._metrics.close()
        self.notify()

    # ---- loop side: devices ----

    async def attach(self, session, hello: Hello) -> Device:
        """The device's state for this session (new, resumed from a checkpoint, or taken over from an
        older connection of the same device, whose untrained batches are dropped: the device resends them)."""
        for key in ("task", "task_type", "num_labels"):
            if getattr(hello, key) != self.task[key]:
                raise ProtocolError("run_mismatch", f"federated run {self.name!r} trains {key}={self.task[key]!r}, "
                                                   f"the HELLO says {getattr(hello, key)!r}; send another run name")
        self._check_alive()
        family = family_of(hello)
        if family.key not in self.model.alignments:
            await asyncio.get_running_loop().run_in_executor(None, self._add_family, family)
        with self.cond:
            dev = self.devices.get(hello.device_id)
            if dev is None:
                dev = Device(hello.device_id, hello, family.key)
                saved = self._resumed.get(hello.device_id)
                if saved is not None:
                    _check_device(saved["identity"], dev.identity(), self.name)
                    del self._resumed[hello.device_id]
                    dev.trained = dev.accepted = int(saved["trained"])
                    dev.staleness_sum, dev.batches = int(saved["staleness_sum"]), int(saved["batches"])
                self.devices[hello.device_id] = dev
                old = None
            else:
                _check_device(dev.identity(), dict(hello.identity(), num_layers=hello.num_layers), self.name)
                old = dev.session
                dev.queue.clear()  # never acknowledged: the device sends them again
            dev.session, dev.done = session, False
            self.cond.notify_all()
        if old is not None and old is not session:
            asyncio.ensure_future(old.fail(ProtocolError("replaced", "a newer connection of this device took over")))
        try:
            await self.wait_until(lambda: not dev.in_step)
            self._check_alive()
        except BaseException:
            self.detach(dev, session)  # never leave a dead session looking like a streaming device
            raise
        dev.accepted = dev.trained
        session.credits = self.config.queue_size
        return dev

    def detach(self, dev: Device, session) -> None:
        with self.cond:
            if dev.session is session:
                dev.session = None
            self.cond.notify_all()  # the max-share rule no longer waits for this device

    def receive(self, dev: Device, session, frame: wire.Frame, nbytes: int) -> None:
        """A BATCH from `session`: validated against its HELLO, counted, queued in the device's FIFO."""
        cfg = self.config
        if dev.session is not session:
            raise ProtocolError("replaced", "a newer connection of this device took over")
        self._check_alive()
        batch = accept_batch(frame.body, dev.hello, session.formats, session.credits, session.last_seq,
                             cfg.max_rows, cfg.max_tokens)
        if dev.accepted + len(batch.sample_ids) > dev.total:
            raise ProtocolError("bad_batch", f"more than epochs x samples_per_epoch = {dev.total} samples")
        session.credits -= 1
        session.last_seq = batch.seq
        dev.accepted += len(batch.sample_ids)
        dev.bytes_received += nbytes
        self.bytes_received += nbytes
        with self.cond:
            dev.queue.append(FedItem(batch, nbytes, session, self.step))
            self.cond.notify_all()

    async def finish(self, dev: Device) -> tuple[bytes, dict]:
        """DONE: train the device's FIFO, then export the shared body + its alignment for it."""
        with self.cond:
            dev.done = True
            self.cond.notify_all()
        await self.wait_until(lambda: not dev.queue and not dev.in_step)
        self._check_alive()
        return await asyncio.get_running_loop().run_in_executor(None, self.export_for, dev)

    def _check_alive(self) -> None:
        if self.phase == "failed":
            raise ProtocolError("training_failed", self.error or "training failed")
        if self.stopped or self.stop_requested.is_set():
            raise ProtocolError("shutting_down", "the server is stopping; reconnect later to resume")

    def _credit(self, dev: Device, item: FedItem, samples_done: int) -> None:
        """Return the item's credit to the session that sent it (if it still feeds the run)."""
        def send():
            if dev.session is item.session:
                item.session.grant_credit(item.batch.seq, samples_done)

        self.deliver(send)

    # ---- families and export (executor threads) ----

    def _add_family(self, family: Family) -> None:
        with self.model_lock:
            if family.key in self.model.alignments:
                return
            align = self.model.add_family(family)
            self.optimizer.add_param_group({"params": list(align.parameters()), "family": family.key})
            self.views[family.key] = self.model.view(family.key)
            self._save_config()  # under the lock: concurrent new families write one file
        log.info("federated run %s: new backbone family %s (%s, %d layers, taps %s -> slots %s)", self.name,
                 family.key, family.model_id, family.num_layers, [t[0] for t in family.taps],
                 family.slots(self.fed.slots))

    def export_for(self, dev: Device) -> tuple[bytes, dict]:
        """ONNX of the current shared body + the device's alignment, checked against torch; the exact
        weights go to runs/<run>/devices/<device>/ next to the graph."""
        with self.model_lock:
            view = copy.deepcopy(self.views[dev.family]).float().cpu().eval()
            step = self.step
        onnx_bytes = export_onnx(view)
        diff = check_onnx(onnx_bytes, view)
        folder = self.folder / "devices" / dev.device_id
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(folder / MODEL_FILE, onnx_bytes)
        family = self.model.families[dev.family]
        write_checkpoint(folder, {"config": asdict(view.cfg), "slots": self.fed.slots, "family": family.to_dict(),
                                  "state": view.state_dict(), "step": step}, ALIGNED)
        meta = ModelMeta(asdict(view.cfg), len(dev.taps), self.task["task"], self.task["task_type"],
                         self.task["num_labels"], self.name, [t.to_meta() for t in dev.taps],
                         dict(self._device_summary(dev), onnx_max_abs_diff=diff, steps=step,
                              shared_samples_trained=self.samples_trained),
                         FedModel(dev.family, family.slots(self.fed.slots), self.fed.slots, family.num_layers,
                                  step)).to_meta()
        write_json(folder / "model.json", meta)
        self._write_summary()
        return onnx_bytes, meta

    # ---- training thread ----

    def _share(self, device_id: str, extra: int = 0) -> float:
        total = self.window_total + extra
        return (self.window_counts[device_id] + extra) / total if total else 0.0

    def _pick(self) -> Device | None:
        """The device whose head batch trains next (None: wait). Called with `cond` held."""
        ready = [d for d in self.devices.values() if d.queue]
        if not ready:
            return None
        cap = self.fed.max_share
        if cap < 1:
            allowed = [d for d in ready if self._share(d.device_id, len(d.queue[0].batch.sample_ids)) <= cap + 1e-9]
            if not allowed:  # nobody can train within the cap: the least served device goes next ...
                floor = min(self._share(d.device_id) for d in ready)
                if any(d.streaming and not d.queue and self._share(d.device_id) <= floor
                       for d in self.devices.values()):
                    return None  # ... even if that means waiting for the batch of one that still streams
                allowed = ready
            ready = allowed
        return min(ready, key=lambda d: (self._share(d.device_id), d.queue[0].arrived_step, d.device_id))

    def train_loop(self) -> None:
        while True:
            t0 = time.perf_counter()
            with self.cond:
                while not self.stop_requested.is_set() and (dev := self._pick()) is None:
                    self.cond.wait()
                if self.stop_requested.is_set():
                    break
                item = dev.queue.popleft()
                dev.in_step = True
                trained_before = dev.trained
            waited = time.perf_counter() - t0
            self._wait_s += waited
            self._credit(dev, item, trained_before)
            try:
                self._train_step(dev, item, waited)
            finally:
                with self.cond:
                    dev.in_step = False
                    self.cond.notify_all()
                self.notify()
            if self.step % self.config.checkpoint_every == 0:
                self._save_checkpoint()

    def on_exit(self) -> None:
        if self.phase != "failed":
            self._save_checkpoint()
            self._write_summary()

    def _train_step(self, dev: Device, item: FedItem, waited: float) -> None:
        t0 = time.perf_counter()
        rows = rows_for_model(item.batch, self.config.side.pooling)
        lr = self.optim.lr * lr_factor(self.samples_trained, self.fed.warmup_samples)
        align_lr = self.optim.lr * lr_factor(self.family_samples[dev.family], self.fed.warmup_samples)
        with self.model_lock:  # only the shared group and this family's have grads
            step = train_step(self.views[dev.family], self.optimizer, rows, dev.taps, self.task["task_type"],
                              self.device, lambda g: align_lr if g.get("family") == dev.family else lr,
                              self.optim.grad_clip)
        loss_value, grad_norm, logits = step.loss, step.grad_norm, step.logits
        check_finite(loss_value, self.step + 1, f" (device {dev.device_id})")
        n = len(rows)
        staleness = self.step - item.arrived_step
        lag = None if dev.last_step is None else self.step - dev.last_step
        with self.cond:
            self.step += 1
            self.samples_trained += n
            self.family_samples[dev.family] += n
            dev.trained += n
            dev.last_step = self.step
            dev.batches += 1
            dev.staleness_sum += staleness
            dev.staleness_max = max(dev.staleness_max, staleness)
            self.window.append((dev.device_id, n))
            self.window_counts[dev.device_id] += n
            self.window_total += n
            while self.window_total - self.window[0][1] >= self.fed.share_window:
                old_id, old_n = self.window.popleft()
                self.window_counts[old_id] -= old_n
                self.window_total -= old_n
            share = self._share(dev.device_id)
            queued = sum(len(d.queue) for d in self.devices.values())
            streaming = sum(d.streaming for d in self.devices.values())
            dev.recent.append((loss_value * n, n, logits.detach().float().cpu().numpy(), rows.labels))
            dev.recent_rows += n
            while dev.recent_rows - dev.recent[0][1] >= dev.hello.samples_per_epoch:
                dev.recent_rows -= dev.recent.popleft()[1]
        now = time.perf_counter()
        record = {"step": self.step, "time": time.time(), "device": dev.device_id, "family": dev.family,
                  "rows": n, "tokens": item.batch.n_tokens, "loss": loss_value, "lr": lr, "align_lr": align_lr,
                  "grad_norm": grad_norm, "samples": self.samples_trained, "device_samples": dev.trained,
                  "device_epoch": dev.trained / dev.hello.samples_per_epoch, "staleness": staleness,
                  "device_lag": lag, "share": share, "window": self.window_total, "queue_depth": queued,
                  "streaming_devices": streaming, "wait_s": waited, "step_s": now - t0,
                  "idle_frac": self._wait_s / max(now - self._t0, 1e-9), "bytes_received": self.bytes_received}
        append_record(self._metrics, record)

    # ---- summaries and checkpoints ----

    def _device_summary(self, dev: Device) -> dict:
        out = {"samples_trained": dev.trained, "batches": dev.batches, "bytes_received": dev.bytes_received,
               "mean_staleness": dev.staleness_sum / max(dev.batches, 1), "max_staleness": dev.staleness_max,
               "share_of_all": dev.trained / max(self.samples_trained, 1), "family": dev.family}
        with self.cond:
            recent = list(dev.recent)
        rows = sum(r[1] for r in recent)
        if rows:
            out["last_epoch_loss"] = sum(r[0] for r in recent) / rows
            outputs, labels = np.concatenate([r[2] for r in recent]), np.concatenate([r[3] for r in recent])
            out.update(last_epoch_scores(self.task["task"], self.task["task_type"], self.task["num_labels"],
                                         outputs, labels))
        return out

    def summary(self) -> dict:
        with self.cond:
            devices = list(self.devices.values())
        return {"run": self.name, **self.task, "steps": self.step, "samples_trained": self.samples_trained,
                "bytes_received": self.bytes_received, "families": {k: f.to_dict() for k, f in
                                                                    self.model.families.items()},
                "devices": {d.device_id: self._device_summary(d) for d in devices},
                "train_idle_frac": self._wait_s / max(time.perf_counter() - self._t0, 1e-9)}

    def _write_summary(self) -> None:
        with self._summary_lock:  # device exports run in parallel: one writer of summary.json at a time
            write_json(self.folder / SUMMARY, self.summary())

    def _save_config(self) -> None:
        data = {"run": self.name, **self.task, "side": asdict(self.model.cfg), "fed": asdict(self.fed),
                "optim": asdict(self.optim), "families": {k: f.to_dict() for k, f in self.model.families.items()}}
        write_json(self.folder / CONFIG, data)

    def _save_checkpoint(self) -> None:
        """Called by the training thread only, so no step runs meanwhile; the locks keep a family from
        being added halfway, and are released before the (slow) write."""
        with self.model_lock:
            state = {
                "model": self.model.state_dict(),
                "families": [f.to_dict() for f in self.model.families.values()],  # = optimizer group order
                "optimizer": self.optimizer.state_dict(),
                "progress": {"step": self.step, "samples_trained": self.samples_trained,
                             "family_samples": dict(self.family_samples)},
                "task": dict(self.task),
            }
        with self.cond:
            devices = dict(self._resumed)
            devices.update({d.device_id: {"identity": d.identity(), "trained": d.trained, "batches": d.batches,
                                          "staleness_sum": d.staleness_sum} for d in self.devices.values()})
        state["devices"] = devices
        write_checkpoint(self.folder, state)

    def _load(self, state: dict) -> None:
        if state.get("task") != self.task:
            raise ProtocolError("run_mismatch", f"federated run {self.name!r} was started for {state.get('task')}, "
                                               f"the HELLO says {self.task}; send another run name")
        for data in state["families"]:
            family = Family.from_dict(data)
            align = self.model.add_family(family)
            self.optimizer.add_param_group({"params": list(align.parameters()), "family": family.key})
            self.views[family.key] = self.model.view(family.key)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["progress"]["step"])
        self.samples_trained = int(state["progress"]["samples_trained"])
        self.family_samples.update({k: int(v) for k, v in state["progress"]["family_samples"].items()})
        self._resumed = dict(state["devices"])


def _check_device(saved: dict, got: dict, run: str) -> None:
    for key, value in got.items():
        if saved.get(key) != value:
            raise ProtocolError("run_mismatch", f"device was in federated run {run!r} with {key}={saved.get(key)!r}, "
                                               f"the HELLO says {value!r}; use another device_id or run name")


def load_aligned(folder: Path | str) -> AlignedSide:
    """The exact torch model a device received (runs/<run>/devices/<device>/aligned.pt), in eval mode."""
    from .config import SideConfig

    data = torch.load(Path(folder) / ALIGNED, map_location="cpu", weights_only=True)
    cfg = SideConfig(**data["config"])
    family = Family.from_dict(data["family"])
    view = AlignedSide(SharedSide(dataclasses.replace(cfg, tap_widths=[]), data["slots"]),
                       Alignment(family, cfg.side_width, data["slots"], cfg.ln_eps))
    view.load_state_dict(data["state"])
    return view.eval()

