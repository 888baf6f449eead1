"""Single-device training: the trivial strategy of the one training loop (`training.py`).

One member, the device named in the run's config, whose stream is the whole schedule: its batches
train in arrival order (every epoch, or with `--cache` the first one), then with `--cache` the
later epochs come from the on-disk cache in a seeded order. The learning rate warms up and decays
linearly to zero over the declared samples (`WarmupLinear`). When training is complete the run
exports its side network (ONNX, checked against torch) and writes summary.json.

With `--cache --select-epochs` the cached epochs are chosen instead of declared: after the stream,
candidate schedules are scored on held-out cached samples (`select.py`), and a fresh side network
is trained on every cached sample with the best one; its schedule (`WarmupLinear` over its own
epochs, from the sample it starts at) replaces the device's.

With `--cache --replay R`, while the stream is on and the device's next batch has not arrived, the
server trains up to R batches drawn (seeded) from the samples cached so far, at the streamed
schedule's current learning rate: the server's idle time turns into training, so the streamed
network reaches a given accuracy sooner. Replayed samples do not advance the schedule, the epochs
or the cached-epoch order (the schedule's position is `samples_trained - replayed`), and with
`--select-epochs` the run's result is still the fresh network trained after the selection.

Phases: stream -> [select ->] cache (`--cache` only) -> export -> finished; any exception fails the run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from mobillm.common import wire
from mobillm.common.messages import BitPlan, ModelMeta, allowed_formats

from .config import RunConfig, atomic_write
from .core import MODEL_FILE, SUMMARY, MixedPrecision, WarmupLinear, append_record, last_epoch_scores, make_optimizer, open_metrics, \
    train_step, write_json
from .data import TapCache, rows_for_model
from .export import check_onnx, export_onnx
from .model import EnsembleSide, build_side_network, members_from_state
from .select import select_schedule, selectable, train_members
from .training import END, Fit, Member, TrainingRun, Work

log = logging.getLogger("mobillm.trainer")

TRAINED_IDS = "trained_ids.jsonl"  # per step: the sample ids trained and their position in the run's order


class SingleDevice:
    """The strategy of a run fed by one device: its side network, its queue in arrival order, then its cache."""

    def __init__(self, cfg: RunConfig, folder: Path, device: str, bitplan_every: int, checkpoint: dict | None = None):
        self.cfg, self.folder = cfg, Path(folder)
        self.device = torch.device(device)
        self.taps = list(cfg.taps)
        self.model = build_side_network(cfg.side, cfg.optim.seed).to(self.device)
        self.optimizer = make_optimizer(self.model, cfg.optim)
        self.amp = MixedPrecision(cfg.optim.precision, self.device)
        self.schedule = WarmupLinear(round(cfg.optim.warmup_ratio * cfg.total_samples), cfg.total_samples)
        self.bitplan_every = bitplan_every
        self.member = Member(cfg.device_id, cfg.samples_per_epoch if cfg.cache else cfg.total_samples, cfg.cache)
        self.phase = "stream"
        self.cache_epoch = 1
        self.cache_pos = 0
        self.first_batch_rows = 0
        self.peak_lr = cfg.optim.lr
        self.last_cache_epoch = cfg.epochs  # cached epochs run while cache_epoch < this
        self.end_samples = cfg.total_samples  # the run's last epoch ends here
        self.selection: dict | None = None
        self.ensemble: list = []  # --ensemble: members 1.. (member 0 is self.model), trained at the selection
        self.replayed = 0  # --replay: samples trained from the cache during the stream (off the schedule)
        self.replay_steps = 0
        self._replays_in_gap = 0  # replayed batches since the last streamed one
        self.cache = None
        if cfg.cache:  # the cache keeps each tap in the one format the device sends it in
            fmts = allowed_formats([t.fmt for t in self.taps], cfg.bits)
            cached = [dataclasses.replace(t, fmt=f) for t, f in zip(self.taps, fmts)]
            label_dtype = wire.LABEL_DTYPES[wire.LABEL_KINDS[cfg.task_type]]
            self.cache = TapCache(self.folder / "cache", cached, label_dtype, checkpoint and checkpoint.get("cache"))
        self._order_epoch, self._order = 0, None
        self._last_step_end = time.perf_counter()
        self._importance = torch.zeros(len(self.taps), device=self.device)
        self._importance_steps = 0
        self._last_epoch = {"loss_sum": 0.0, "rows": 0, "outputs": [], "labels": []}
        self.summary: dict = {}
        if checkpoint is not None:
            self._load(checkpoint)
        self.member.done = self.phase != "stream"
        keep = checkpoint["progress"]["step"] if checkpoint is not None else None
        self._trained_ids = open_metrics(self.folder / TRAINED_IDS, keep)

    @property
    def onnx_path(self) -> Path:
        return self.folder / MODEL_FILE

    def model_meta(self) -> ModelMeta:
        """MODEL frame meta: how to feed the ONNX graph and what it was trained for."""
        return ModelMeta(self.cfg.side.to_meta(), len(self.taps), self.cfg.task, self.cfg.task_type,
                         self.cfg.num_labels, self.cfg.run, self.cfg.taps, self.summary)

    # ---- the schedule ----

    def members(self) -> list[Member]:
        return [self.member]

    def pick(self, members: list[Member]) -> Member | None:
        return self.member if self.phase == "stream" and self.member.queue else None

    def position(self, run: TrainingRun) -> int:
        """Where the run is in its schedule: samples trained, less those replayed (`--replay`)."""
        return run.samples_trained - self.replayed

    def idle_work(self, run: TrainingRun) -> Work | object | None:
        if self.phase == "stream":
            if not self.member.done:
                if self._can_replay():
                    return Work(source="replay")
                return None  # the device streams on
            self._end_stream()  # DONE, and every batch before it trained
        return Work(source=self.phase) if self.phase in ("select", "cache") else END

    def _can_replay(self) -> bool:
        """--replay: another cached batch may train while the device's next one is on its way."""
        return (self.cfg.optim.replay > 0 and self.cache is not None and self.first_batch_rows > 0
                and len(self.cache) >= self.first_batch_rows and self._replays_in_gap < self.cfg.optim.replay)

    def _replay_rows(self):
        """A seeded draw of one batch from the samples cached so far."""
        rng = np.random.default_rng([self.cfg.optim.seed, 0x2E91A7, self.replay_steps])
        return self.cache.gather(np.sort(rng.choice(len(self.cache), self.first_batch_rows, replace=False)))

    def _end_stream(self) -> None:
        """The stream is over (DONE, or with --cache a whole epoch trained): cached epochs, or export."""
        self.member.done = True
        if self.cache is None:
            self.phase = "export"
            return
        if self.cfg.optim.select_epochs and selectable(self.cfg, len(self.cache)):
            self.phase = "select"
            log.info("run %s: %d samples cached; choosing the cached epochs on held-out samples", self.cfg.run,
                     len(self.cache))
            return
        self.phase = "cache" if self.cfg.epochs > 1 and len(self.cache) else "export"
        log.info("run %s: %d samples cached; %s", self.cfg.run, len(self.cache),
                 f"training {self.cfg.epochs - 1} more epochs from the cache" if self.phase == "cache" else "exporting")

    def _select(self, run: TrainingRun) -> None:
        """Choose (epochs, lr) on held-out cached samples, then start a fresh side network on every
        cached sample with them: a schedule of its own from this sample on (the training thread, no lock)."""
        batch = self.cfg.optim.cache_batch_size or self.first_batch_rows or 32
        choice = select_schedule(self.cfg, self.cache, self.taps, batch, self.device, self.amp)
        self.selection = choice.to_dict()
        self.ensemble = train_members(self.cfg, self.cache, choice, batch, self.taps, self.device, self.amp)
        if self.ensemble:
            self.selection["ensemble"] = 1 + len(self.ensemble)
        fresh = build_side_network(self.cfg.side, self.cfg.optim.seed)
        self.model.load_state_dict(fresh.state_dict())
        self.optimizer = make_optimizer(self.model, self.cfg.optim)
        self.amp = MixedPrecision(self.cfg.optim.precision, self.device)
        n = len(self.cache)
        self.peak_lr = choice.lr
        self.end_samples = self.position(run) + choice.epochs * n
        self.schedule = WarmupLinear(round(self.cfg.optim.warmup_ratio * choice.epochs * n), choice.epochs * n,
                                     start=self.position(run))
        self.cache_epoch, self.cache_pos, self.last_cache_epoch = 1, 0, 1 + choice.epochs
        self._last_epoch = {"loss_sum": 0.0, "rows": 0, "outputs": [], "labels": []}
        self.phase = "cache"
        log.info("run %s: training %d epoch(s) from the cache at lr %g on all %d samples", self.cfg.run,
                 choice.epochs, choice.lr, n)

    def _cached_rows(self):
        if self._order_epoch != self.cache_epoch:
            self._order = np.random.default_rng([self.cfg.optim.seed, self.cache_epoch]).permutation(len(self.cache))
            self._order_epoch = self.cache_epoch
        size = self.cfg.optim.cache_batch_size or self.first_batch_rows or 32
        return self.cache.gather(self._order[self.cache_pos:self.cache_pos + size])

    # ---- one step ----

    def fit(self, work: Work, run: TrainingRun) -> Fit:
        if work.item is not None:
            rows = rows_for_model(work.item.batch, self.cfg.side.pooling)
            if self.first_batch_rows == 0:
                self.first_batch_rows = len(rows)
            if self.cache is not None:
                self.cache.append(rows)
            self._replays_in_gap = 0
        elif work.source == "replay":
            rows = self._replay_rows()
        else:
            if work.source == "select":  # the selection runs first; this step is the chosen schedule's first
                self._select(run)
                work.source = "cache"
            rows = self._cached_rows()
        want_importance = self.bitplan_every > 0
        lr = self.peak_lr * self.schedule.factor(self.position(run))
        step = train_step(self.model, self.optimizer, rows, self.taps, self.cfg.task_type, self.device, lambda _: lr,
                          self.cfg.optim.grad_clip, want_importance, self.amp)
        if want_importance:
            # Per tap: RMS of d loss / d (dequantized activation), a proxy for how much that tap's
            # quantization error matters; the device may spend bits where it is largest.
            self._importance += torch.stack([t.grad.pow(2).mean().sqrt() for t in step.inputs]).detach()
            self._importance_steps += 1
        return Fit(step, rows, {"lr": lr})

    def aggregate(self, work: Work, fit: Fit, run: TrainingRun) -> dict:
        cfg, rows, n = self.cfg, fit.rows, len(fit.rows)
        if work.source == "replay":
            self.replayed += n
            self.replay_steps += 1
            self._replays_in_gap += 1
            append_record(self._trained_ids, {"step": run.step, "replay": True, "ids": rows.sample_ids.tolist()})
            return {"epoch": self.position(run) / cfg.samples_per_epoch, "source": work.source}
        epoch_len = len(self.cache) if self.selection else cfg.samples_per_epoch
        if self.position(run) > self.end_samples - epoch_len:
            self._last_epoch["loss_sum"] += fit.step.loss * n
            self._last_epoch["rows"] += n
            self._last_epoch["outputs"].append(fit.step.logits.detach().float().cpu().numpy())
            self._last_epoch["labels"].append(rows.labels)
        if work.item is None:
            self.cache_pos += n
            if self.cache_pos >= len(self.cache):
                self.cache_epoch, self.cache_pos = self.cache_epoch + 1, 0
                if self.cache_epoch >= self.last_cache_epoch:
                    self.phase = "export"
        elif self.cache is not None and self.member.trained >= cfg.samples_per_epoch:
            self._end_stream()
        # Which samples this step trained; `first` is their position in the run's order (all epochs back
        # to back), so row i belongs to epoch (first + i) // samples_per_epoch. See read_trained_ids.
        append_record(self._trained_ids, {"step": run.step, "first": self.position(run) - n,
                                          "ids": rows.sample_ids.tolist()})
        now = time.perf_counter()
        fields = {"epoch": self.position(run) / cfg.samples_per_epoch, "source": work.source,
                  "samples_per_s": n / max(now - self._last_step_end, 1e-9)}
        self._last_step_end = now
        return fields

    def bitplan(self, step: int) -> BitPlan | None:
        if not (self.bitplan_every and step % self.bitplan_every == 0 and self._importance_steps):
            return None
        importance = (self._importance / self._importance_steps).tolist()
        self._importance.zero_()
        self._importance_steps = 0
        return BitPlan(importance, step)

    # ---- the end ----

    def finish(self, run: TrainingRun) -> None:
        """Final checkpoint, ONNX export checked against torch, summary; then `finished`."""
        if self.phase == "finished":
            return
        run.save_checkpoint()
        model = EnsembleSide([self.model, *self.ensemble]) if self.ensemble else self.model
        onnx_bytes = export_onnx(model)
        diff = check_onnx(onnx_bytes, model)
        atomic_write(self.onnx_path, onnx_bytes)
        self.summary = self._summarize(diff, run)
        write_json(self.folder / SUMMARY, self.summary)
        self.phase = "finished"
        run.save_checkpoint()
        log.info("run %s finished: %s", self.cfg.run, self.summary)

    def close(self, run: TrainingRun) -> None:
        self._trained_ids.close()
        if self.cache is not None:
            self.cache.close()

    def _summarize(self, onnx_diff: float, run: TrainingRun) -> dict:
        last = self._last_epoch
        summary = {"samples_trained": run.samples_trained, "steps": run.step, "onnx_max_abs_diff": onnx_diff,
                   "train_idle_frac": run.idle_frac()}
        if last["rows"]:
            summary["last_epoch_loss"] = last["loss_sum"] / last["rows"]
            outputs, labels = np.concatenate(last["outputs"]), np.concatenate(last["labels"])
            summary.update(last_epoch_scores(self.cfg.task, self.cfg.task_type, self.cfg.num_labels, outputs, labels))
        if self.selection is not None:
            summary["selection"] = self.selection
        if self.replayed:
            summary["replayed"] = {"samples": self.replayed, "steps": self.replay_steps}
        return summary

    # ---- checkpoints ----

    def state_dict(self, progress: dict, run: TrainingRun) -> dict:
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "progress": dict(progress, stream_trained=self.member.trained, cache_epoch=self.cache_epoch,
                             cache_pos=self.cache_pos, first_batch_rows=self.first_batch_rows, phase=self.phase,
                             replayed=self.replayed, replay_steps=self.replay_steps,
                             replays_in_gap=self._replays_in_gap),
            "rng": {"torch": torch.get_rng_state()},
            "cache": self.cache.state() if self.cache is not None else None,
            "summary": self.summary,
            "last_epoch": self._last_epoch_state(),
        }
        if self.selection is not None:  # the chosen schedule (a run without selection keeps its old layout)
            state["selection"] = {"choice": self.selection, "peak_lr": self.peak_lr,
                                  "last_cache_epoch": self.last_cache_epoch, "end_samples": self.end_samples,
                                  "members": [m.state_dict() for m in self.ensemble]}
        if self.device.type == "cuda":
            state["rng"]["cuda"] = torch.cuda.get_rng_state(self.device)
        return self.amp.save_to(state)

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
        self.amp.load_from(state)
        self.schedule.load_state_dict(state["schedule"])
        p = state["progress"]
        self.member.trained = self.member.accepted = int(p["stream_trained"])
        self.cache_epoch, self.cache_pos = p["cache_epoch"], p["cache_pos"]
        self.first_batch_rows = p["first_batch_rows"]
        self.phase = p["phase"]
        self.replayed, self.replay_steps = int(p.get("replayed", 0)), int(p.get("replay_steps", 0))
        self._replays_in_gap = int(p.get("replays_in_gap", 0))
        self.summary = state.get("summary") or {}
        if state.get("selection"):
            sel = state["selection"]
            self.selection, self.peak_lr = sel["choice"], float(sel["peak_lr"])
            self.last_cache_epoch, self.end_samples = int(sel["last_cache_epoch"]), int(sel["end_samples"])
            self.ensemble = members_from_state(self.cfg, sel.get("members") or [], self.device)
        last = state.get("last_epoch")
        if last:
            self._last_epoch = {"loss_sum": float(last["loss_sum"]), "rows": int(last["rows"]),
                                "outputs": [last["outputs"].numpy()], "labels": [last["labels"].numpy()]}
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        if self.phase == "finished" and not self.onnx_path.is_file():
            self.phase = "export"  # the ONNX file went missing: make it again


def read_trained_ids(folder: Path | str, device: str | None = None) -> dict[int, list[int]]:
    """{epoch: sample ids trained in that epoch, in training order} from a run's trained_ids.jsonl.

    It holds exactly the steps the run's model has seen: a resumed run cuts the steps after its
    checkpoint before training them again. A sample trained exactly once per epoch appears once
    in each epoch's list; batches replayed during the stream (`--replay`, marked `replay`) belong to
    no epoch and are left out. A federated run of several ranks (docs/scale_out.md) logs per rank
    (trained_ids.rank<R>.jsonl): the ranks are merged in step order, for one `device`."""
    folder = Path(folder)
    ranks = sorted(folder.glob("trained_ids.rank*.jsonl"))
    if ranks:
        if device is None:
            raise ValueError(f"{folder} is a federated run of several ranks: name the device")
        records = sorted((r for path in ranks for r in _records(path) if r["device"] == device),
                         key=lambda r: r["step"])
        per_epoch = records[0]["per_epoch"] if records else 1
    else:
        per_epoch = RunConfig.load(folder).samples_per_epoch
        records = _records(folder / TRAINED_IDS)
    out: dict[int, list[int]] = {}
    for record in records:
        if record.get("replay"):
            continue
        for i, sid in enumerate(record["ids"]):
            out.setdefault((record["first"] + i) // per_epoch, []).append(sid)
    return out


def _records(path: Path) -> list[dict]:
    lines = path.read_text().splitlines()
    out = []
    for n, line in enumerate(lines):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if n == len(lines) - 1:
                break  # torn by a kill mid-write, before a resume could cut it
            raise
    return out

