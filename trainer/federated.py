"""Federated side-tuning (`trainer serve --federated`): many devices and backbones, one side network per task.

Devices speak the ordinary protocol (`docs/protocol.md`); what changes is the strategy of their run
(the loop itself is `training.TrainingRun`, the same as for one device):

- One run per task (run `fed-<task>`, or the HELLO's `run`) for every device that sends that
  task, whatever its backbone. Several devices stream into it at once, each with its own credits
  (`--queue`) and its own FIFO of received batches.
- A family (engine) seen for the first time gets an `Alignment` (`fed_model.py`): per-tap LayerNorm +
  projection to the shared width, slots chosen by relative depth. Its parameters join the optimizer
  and train jointly with the shared adapters and head.
- `Federated.pick`: the head batch of the device with the smallest share of the last `share_window`
  trained samples goes next. The loop never waits while any FIFO holds a batch, so a fast device is
  not held back by a slow one; with `--max-share` a device above that share waits while another
  connected device that still streams is below it.
- DONE from a device: its FIFO is trained, then it receives the current shared body + its family's
  alignment as one ONNX graph with the ordinary side-network contract. Training goes on for the others.

`policy.FederatedPolicy` opens these runs. Locks: the run's `cond` guards the devices and FIFOs;
`model_lock` covers each optimizer step, each new family and each snapshot taken for export.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
import logging
import math
import threading
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from mobillm.common.messages import FedModel, Hello, ModelMeta, ProtocolError

from .config import ServerConfig, atomic_write
from .core import MODEL_FILE, SUMMARY, MixedPrecision, last_epoch_scores, make_optimizer, train_step, \
    write_checkpoint, write_json
from .data import rows_for_model
from .export import check_onnx, export_onnx
from .fed_model import AlignedSide, Alignment, Family, FedSideModel, SharedSide
from .training import Fit, Member, TrainingRun, Work

log = logging.getLogger("mobillm.trainer")

CONFIG = "fed_config.json"
ALIGNED = "aligned.pt"


@dataclass
class Device(Member):
    """One device of a federated run: its HELLO, backbone family and contribution so far."""

    hello: Hello | None = None
    family: str = ""
    last_step: int | None = None
    batches: int = 0
    staleness_sum: int = 0
    staleness_max: int = 0
    recent: deque = field(default_factory=deque)  # (loss * rows, rows, logits, labels) of its last epoch
    recent_rows: int = 0

    @property
    def taps(self) -> list:
        return list(self.hello.taps)

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


class Federated:
    """The strategy of a run fed by many devices and backbones: one shared side network, fair scheduling."""

    def __init__(self, name: str, folder: Path, config: ServerConfig, hello: Hello, checkpoint: dict | None = None):
        self.name, self.folder, self.config = name, Path(folder), config
        self.fed, self.optim = config.fed, config.optim
        self.task = {"task": hello.task, "task_type": hello.task_type, "num_labels": hello.num_labels}
        self.device = torch.device(config.device)
        side = dataclasses.replace(config.side, tap_widths=[], out_dim=hello.out_dim, side_width=self.fed.width)
        self.model = FedSideModel(side, self.fed.slots, self.optim.seed).to(self.device)
        self.optimizer = make_optimizer(self.model.shared, self.optim)  # one param group more per family
        self.amp = MixedPrecision(self.optim.precision, self.device)
        self.views: dict[str, AlignedSide] = {}
        self.model_lock = threading.Lock()
        self._summary_lock = threading.Lock()
        self.family_samples: Counter = Counter()  # samples trained per backbone family (its alignment's lr)
        self.window: deque[tuple[str, int]] = deque()  # (device, rows) of the last share_window samples
        self.window_counts: Counter = Counter()
        self.window_total = 0
        self.phase = "train"  # until the server stops: devices come and go
        self._resumed: dict[str, dict] = {}  # device progress from a checkpoint, until the device reconnects
        if checkpoint is not None:
            self._load(checkpoint)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._save_config()

    # ---- devices (the server's loop) ----

    async def join(self, run: TrainingRun, session, hello: Hello) -> Device:
        """The device's state for this session (new, resumed from a checkpoint, or taken over from an
        older connection of the same device), attached to `run` with its credits."""
        for key in ("task", "task_type", "num_labels"):
            if getattr(hello, key) != self.task[key]:
                raise ProtocolError("run_mismatch", f"federated run {self.name!r} trains {key}={self.task[key]!r}, "
                                                   f"the HELLO says {getattr(hello, key)!r}; send another run name")
        run.check_alive()
        family = family_of(hello)
        if family.key not in self.model.alignments:
            await asyncio.get_running_loop().run_in_executor(None, self._add_family, family)
        with run.cond:
            dev = run.members.get(hello.device_id)
            if dev is None:
                dev = Device(hello.device_id, hello.epochs * hello.samples_per_epoch, hello=hello, family=family.key)
                saved = self._resumed.get(hello.device_id)
                if saved is not None:
                    _check_device(saved["identity"], dev.identity(), self.name)
                    del self._resumed[hello.device_id]
                    dev.trained = dev.accepted = int(saved["trained"])
                    dev.staleness_sum, dev.batches = int(saved["staleness_sum"]), int(saved["batches"])
                run.members[hello.device_id] = dev
            else:
                _check_device(dev.identity(), dict(hello.identity(), num_layers=hello.num_layers), self.name)
            dev.done = False
        await run.attach(dev, session)
        return dev

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

    def snapshot(self, dev: Device) -> AlignedSide:
        """A detached copy of what `dev` would get back now (the shared network + its family's
        alignment), for scoring while training goes on."""
        with self.model_lock:
            return copy.deepcopy(self.views[dev.family]).eval()

    def export_for(self, dev: Device, run: TrainingRun) -> tuple[bytes, dict]:
        """ONNX of the current shared body + the device's alignment, checked against torch; the exact
        weights go to runs/<run>/devices/<device>/ next to the graph."""
        with self.model_lock:
            view = copy.deepcopy(self.views[dev.family]).float().cpu().eval()
            step = run.step
        onnx_bytes = export_onnx(view)
        diff = check_onnx(onnx_bytes, view)
        folder = self.folder / "devices" / dev.device_id
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(folder / MODEL_FILE, onnx_bytes)
        family = self.model.families[dev.family]
        write_checkpoint(folder, {"config": asdict(view.cfg), "slots": self.fed.slots, "family": family.to_dict(),
                                  "state": view.state_dict(), "step": step}, ALIGNED)
        meta = ModelMeta(view.cfg.to_meta(), len(dev.taps), self.task["task"], self.task["task_type"],
                         self.task["num_labels"], self.name, list(dev.taps),
                         dict(self._device_summary(dev, run), onnx_max_abs_diff=diff, steps=step,
                              shared_samples_trained=run.samples_trained),
                         FedModel(dev.family, family.slots(self.fed.slots), self.fed.slots, family.num_layers,
                                  step)).to_meta()
        write_json(folder / "model.json", meta)
        self._write_summary(run)
        return onnx_bytes, meta

    # ---- the schedule (the training thread, `cond` held) ----

    def _share(self, device_id: str, extra: int = 0) -> float:
        total = self.window_total + extra
        return (self.window_counts[device_id] + extra) / total if total else 0.0

    def pick(self, members: list[Device]) -> Device | None:
        """The device whose head batch trains next (None: wait)."""
        ready = [d for d in members if d.queue]
        if not ready:
            return None
        cap = self.fed.max_share
        if cap < 1:
            allowed = [d for d in ready if self._share(d.device_id, len(d.queue[0].batch.sample_ids)) <= cap + 1e-9]
            if not allowed:  # nobody can train within the cap: the least served device goes next ...
                floor = min(self._share(d.device_id) for d in ready)
                if any(d.streaming and not d.queue and self._share(d.device_id) <= floor
                       for d in members):
                    return None  # ... even if that means waiting for the batch of one that still streams
                allowed = ready
            ready = allowed
        return min(ready, key=lambda d: (self._share(d.device_id), d.queue[0].arrived_step, d.device_id))

    def members(self) -> list[Member]:
        return []  # devices join as they connect

    def idle_work(self, run: TrainingRun) -> None:
        return None  # only devices' batches train; the run ends when the server stops

    def fit(self, work: Work, run: TrainingRun) -> Fit:
        dev = work.member
        rows = rows_for_model(work.item.batch, self.config.side.pooling)
        lr = self.optim.lr * lr_factor(run.samples_trained, self.fed.warmup_samples)
        align_lr = self.optim.lr * lr_factor(self.family_samples[dev.family], self.fed.warmup_samples)
        with self.model_lock:  # only the shared group and this family's have grads
            step = train_step(self.views[dev.family], self.optimizer, rows, dev.taps, self.task["task_type"],
                              self.device, lambda g: align_lr if g.get("family") == dev.family else lr,
                              self.optim.grad_clip, amp=self.amp)
        return Fit(step, rows, {"lr": lr, "align_lr": align_lr})

    def aggregate(self, work: Work, fit: Fit, run: TrainingRun) -> dict:
        dev, n = work.member, len(fit.rows)
        before = run.step - 1  # the run already counts this step
        staleness = before - work.item.arrived_step
        lag = None if dev.last_step is None else before - dev.last_step
        self.family_samples[dev.family] += n
        dev.last_step = run.step
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
        dev.recent.append((fit.step.loss * n, n, fit.step.logits.detach().float().cpu().numpy(), fit.rows.labels))
        dev.recent_rows += n
        while dev.recent_rows - dev.recent[0][1] >= dev.hello.samples_per_epoch:
            dev.recent_rows -= dev.recent.popleft()[1]
        return {"device": dev.device_id, "family": dev.family, "device_samples": dev.trained,
                "device_epoch": dev.trained / dev.hello.samples_per_epoch, "staleness": staleness,
                "device_lag": lag, "share": self._share(dev.device_id), "window": self.window_total,
                "streaming_devices": sum(d.streaming for d in run.members.values())}

    def bitplan(self, step: int) -> None:
        return None  # each family has its own taps: no one importance vector for all

    def finish(self, run: TrainingRun) -> None:
        """Never reached: `idle_work` never ends the run."""

    def close(self, run: TrainingRun) -> None:
        self._write_summary(run)

    # ---- summaries and checkpoints ----

    def _device_summary(self, dev: Device, run: TrainingRun) -> dict:
        out = {"samples_trained": dev.trained, "batches": dev.batches, "bytes_received": dev.bytes_received,
               "mean_staleness": dev.staleness_sum / max(dev.batches, 1), "max_staleness": dev.staleness_max,
               "share_of_all": dev.trained / max(run.samples_trained, 1), "family": dev.family}
        with run.cond:
            recent = list(dev.recent)
        rows = sum(r[1] for r in recent)
        if rows:
            out["last_epoch_loss"] = sum(r[0] for r in recent) / rows
            outputs, labels = np.concatenate([r[2] for r in recent]), np.concatenate([r[3] for r in recent])
            out.update(last_epoch_scores(self.task["task"], self.task["task_type"], self.task["num_labels"],
                                         outputs, labels))
        return out

    def summary(self, run: TrainingRun) -> dict:
        """summary.json: the shared run's totals, its families and each device's contribution."""
        with run.cond:
            devices = list(run.members.values())
        return {"run": self.name, **self.task, "steps": run.step, "samples_trained": run.samples_trained,
                "bytes_received": run.bytes_received, "families": {k: f.to_dict() for k, f in
                                                                    self.model.families.items()},
                "devices": {d.device_id: self._device_summary(d, run) for d in devices},
                "train_idle_frac": run.idle_frac()}

    def _write_summary(self, run: TrainingRun) -> None:
        with self._summary_lock:  # device exports run in parallel: one writer of summary.json at a time
            write_json(self.folder / SUMMARY, self.summary(run))

    def _flag_changes(self) -> str:
        """The side/fed/optim settings in the run's saved config.json that this server's flags change."""
        try:
            saved = json.loads((self.folder / CONFIG).read_text())
        except (OSError, ValueError):
            return ""
        now = {"side": asdict(self.model.cfg), "fed": asdict(self.fed)}
        return ", ".join(c for key in now for c in _changed(saved.get(key, {}), now[key], key))

    def _save_config(self) -> None:
        data = {"run": self.name, **self.task, "side": asdict(self.model.cfg), "fed": asdict(self.fed),
                "optim": asdict(self.optim), "families": {k: f.to_dict() for k, f in self.model.families.items()}}
        write_json(self.folder / CONFIG, data)

    def state_dict(self, progress: dict, run: TrainingRun) -> dict:
        """Called by the training thread only, so no step runs meanwhile; the locks keep a family from
        being added halfway, and are released before the (slow) write."""
        with self.model_lock:
            state = {
                "model": self.model.state_dict(),
                "families": [f.to_dict() for f in self.model.families.values()],  # = optimizer group order
                "optimizer": self.optimizer.state_dict(),
                "progress": dict(progress, family_samples=dict(self.family_samples)),
                "task": dict(self.task),
            }
        with run.cond:
            devices = dict(self._resumed)
            devices.update({d.device_id: {"identity": d.identity(), "trained": d.trained, "batches": d.batches,
                                          "staleness_sum": d.staleness_sum} for d in run.members.values()})
        state["devices"] = devices
        return self.amp.save_to(state)

    def _load(self, state: dict) -> None:
        if state.get("task") != self.task:
            raise ProtocolError("run_mismatch", f"federated run {self.name!r} was started for {state.get('task')}, "
                                               f"the HELLO says {self.task}; send another run name")
        for data in state["families"]:
            family = Family.from_dict(data)
            align = self.model.add_family(family)
            self.optimizer.add_param_group({"params": list(align.parameters()), "family": family.key})
            self.views[family.key] = self.model.view(family.key)
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError) as exc:  # other shapes or parameters: other side-network flags
            raise ProtocolError("run_mismatch", f"federated run {self.name!r} was trained with other side-network "
                                                f"flags than this server's ({self._flag_changes() or type(exc).__name__}); "
                                                f"its operator restarts `trainer serve` with the run's flags "
                                                f"(runs/{self.name}/config.json), or send another run name") from None
        self.amp.load_from(state)
        self.family_samples.update({k: int(v) for k, v in state["progress"]["family_samples"].items()})
        self._resumed = dict(state["devices"])


def _changed(saved: dict, now: dict, prefix: str) -> list[str]:
    """`prefix.key: saved -> now` for each setting that differs (keys in both)."""
    return [f"{prefix}.{k}: {saved[k]!r} -> {now[k]!r}" for k in saved if k in now and saved[k] != now[k]]


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

