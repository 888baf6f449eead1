"""Federated runs across the ranks of a world: one shared side network per task, data-parallel, in lockstep.

Each rank's devices feed that rank's copy of the run (their own FIFOs, their own credits: a device
never waits on a collective, only on its queue). One `Coordinator` thread per rank trains every
federated run of the rank in *steps the whole world takes together*:

1. each rank takes at most one batch per run from its own devices (`Federated.pick`), possibly none;
2. one `all_gather_object` tells every rank what each contributes (rows, family), which runs and
   backbone families any rank needs opened, and whether any rank is stopping;
3. for each run with rows somewhere: every rank backpropagates its own rows' loss scaled by
   rows / world rows (zero when it has none), one `all_reduce` sums the gradients (and the loss),
   and every rank applies the same clip + AdamW step. The result is the step a single process would
   take on all the world's rows of that step; the parameters stay bit-identical on every rank.

The step itself is `training.TrainingRun`'s, as for every run: the coordinator takes each run's
batch (`TrainingRun.take`), and once the world agreed, calls `TrainingRun.train` with a `WorldWork`;
the strategy `WorldFederated` does the all-reduce in its `fit` and folds the other ranks' rows in
its `aggregate`, and the run writes the common metrics record and checkpoints (a collective) when due.

Cadence: while any rank had rows or queued batches in the last step, no rank waits: ranks with an
empty queue join the collective with zero rows (zero weight: nothing to stall, nothing to bias).
When the whole world is idle, each rank waits up to `--tick-s` for a batch before the next step,
so an idle world costs one small collective per tick. Checkpoints: every `--checkpoint-every`
world steps and at the stop, every rank sends its devices' progress to rank 0, which writes the
one checkpoint; every rank resumes from it. Each rank logs the ids it trained to
trained_ids.rank<R>.jsonl (`run.read_trained_ids` merges them).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

import torch
import torch.distributed as dist

from mobillm.common.messages import Hello, ProtocolError

from .config import ServerConfig
from .core import Step, append_record, apply_gradients, load_checkpoint, open_metrics, step_loss, write_checkpoint
from .data import Rows, rows_for_model
from .federated import Federated, lr_factor
from .fed_model import Family
from .policy import FederatedPolicy, check_new_run
from .training import SHUTTING_DOWN, Fit, TrainingRun, Work

log = logging.getLogger("mobillm.trainer")


def trained_ids_name(rank: int) -> str:
    return f"trained_ids.rank{rank}.jsonl"


class Contribution(NamedTuple):
    """What one rank brings to a world step of a run (all-gathered before it)."""

    family: str | None  # the backbone family of its batch (None: it has none this step)
    rows: int
    tokens: int


@dataclass
class WorldWork(Work):
    """A world step's work on one rank: its own batch, if any, and what every rank contributes."""

    contributions: list[Contribution] = field(default_factory=list)


def shared_step(strategy: Federated, rows: Rows | None, family: str | None, taps, contributions: list[tuple[str, int]],
                samples_before: int, all_reduce: Callable[[torch.Tensor], None]) -> tuple[Step | None, float, float, dict]:
    """One world step of a federated run: (this rank's Step or None, world mean loss, grad norm, lrs).

    `contributions`: (family, rows) of every rank, in rank order; `rows`/`family`/`taps`: this rank's
    (None when it has none). `all_reduce` sums a tensor over the ranks in place (identity for one
    process: then this is exactly a step on `rows` alone)."""
    total = sum(n for _, n in contributions)
    used = sorted({f for f, n in contributions if n})
    model, optimizer, device = strategy.model, strategy.optimizer, strategy.device
    params = list(model.shared.parameters()) + [p for f in used for p in model.alignments[f].parameters()]
    optimizer.zero_grad(set_to_none=True)
    local, loss_sum = None, torch.zeros(1, device=device)
    if rows is not None and len(rows):
        view = strategy.views[family]
        view.train()
        with strategy.amp.autocast():
            loss, logits, inputs = step_loss(view, rows, taps, strategy.task["task_type"], device)
        (loss * (len(rows) / total)).backward()  # weighted by the rows this rank contributes
        loss_sum = loss.detach().float().reshape(1) * len(rows)
        local = Step(float(loss.detach()), 0.0, logits.float(), inputs)
    flat = torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).reshape(-1) for p in params] + [loss_sum])
    all_reduce(flat)
    offset = 0
    for p in params:
        p.grad = flat[offset:offset + p.numel()].view_as(p).clone()
        offset += p.numel()
    warmup = strategy.fed.warmup_samples
    lr = strategy.optim.lr * lr_factor(samples_before, warmup)
    align_lr = {f: strategy.optim.lr * lr_factor(strategy.family_samples[f], warmup) for f in used}
    norm = float(apply_gradients(optimizer, params, lambda g: align_lr.get(g["family"], 0.0) if "family" in g else lr,
                                 strategy.optim.grad_clip, strategy.amp))
    lrs = {"lr": lr, "align_lr": align_lr.get(family, lr) if family else lr}
    return local, float(flat[-1]) / total, norm, lrs


class WorldFederated(Federated):
    """`Federated` as one rank's copy: families are added only between world steps (every rank adds
    them in the same order), and only rank 0 writes the run's shared files."""

    def __init__(self, name, folder, config: ServerConfig, hello: Hello, checkpoint, coordinator: "Coordinator"):
        self.coordinator = coordinator
        self.rank = coordinator.world.rank
        self.pending: dict[str, tuple[Family, threading.Event]] = {}
        super().__init__(name, folder, config, hello, checkpoint)
        keep = checkpoint["progress"]["step"] if checkpoint is not None else None
        self.trained_ids = open_metrics(self.folder / trained_ids_name(self.rank), keep)

    def _add_family(self, family: Family) -> None:
        """A device's new family (an executor thread of its join): wait until the world added it."""
        with self.model_lock:
            if family.key in self.model.alignments:
                return
            added = self.pending.setdefault(family.key, (family, threading.Event()))[1]
        while not added.wait(0.5):
            if self.coordinator.ended.is_set():
                raise ProtocolError(*SHUTTING_DOWN)

    def fit(self, work: WorldWork, run: TrainingRun) -> Fit:
        """This rank's share of the world step (zero rows: zero weight), its gradients summed over the ranks."""
        dev = work.member
        rows = rows_for_model(work.item.batch, self.config.side.pooling) if work.item is not None else None
        with self.model_lock:
            local, loss, norm, lrs = shared_step(self, rows, dev and dev.family, dev and dev.taps,
                                                 [(c.family, c.rows) for c in work.contributions],
                                                 run.samples_trained, self.coordinator.all_reduce)
        if local is not None:
            local.grad_norm = norm
        return Fit(local, rows, lrs, samples=sum(c.rows for c in work.contributions),
                   tokens=sum(c.tokens for c in work.contributions), loss=loss, grad_norm=norm)

    def aggregate(self, work: WorldWork, fit: Fit, run: TrainingRun) -> dict:
        """The other ranks' rows count for their families; this rank's batch, if any, as in `Federated`."""
        for rank, c in enumerate(work.contributions):
            if c.rows and rank != self.rank:
                self.family_samples[c.family] += c.rows  # this rank's own rows: `Federated.aggregate` counts them
        fields = {}
        if work.item is not None:
            dev, n = work.member, len(fit.rows)
            fields = super().aggregate(work, fit, run)
            append_record(self.trained_ids, {"step": run.step, "device": dev.device_id, "first": dev.trained - n,
                                             "per_epoch": dev.hello.samples_per_epoch,
                                             "ids": fit.rows.sample_ids.tolist()})
        return dict(fields, rank_rows=0 if fit.rows is None else len(fit.rows),
                    world_rows=[c.rows for c in work.contributions])

    def take_new_families(self) -> list[dict]:
        with self.model_lock:
            return [f.to_dict() for f, _ in self.pending.values()]

    def add_families(self, families: list[dict]) -> None:
        """Families any rank asked for this step, in key order (the optimizer's group order)."""
        for data in sorted(families, key=lambda d: Family.from_dict(d).key):
            family = Family.from_dict(data)
            Federated._add_family(self, family)
            with self.model_lock:
                entry = self.pending.pop(family.key, None)
            if entry is not None:
                entry[1].set()

    def _save_config(self) -> None:
        if self.rank == 0:
            super()._save_config()

    def _write_summary(self, run: TrainingRun) -> None:
        if self.rank == 0:
            super()._write_summary(run)

    def close(self, run: TrainingRun) -> None:
        super().close(run)
        self.trained_ids.close()


class WorldRun(TrainingRun):
    """A federated run on one rank: no training thread of its own; the coordinator calls `take` and
    `train` in the world's steps."""

    def __init__(self, name, folder, strategy, queue_size, checkpoint_every, checkpoint, coordinator: "Coordinator"):
        self.coordinator = coordinator
        if coordinator.world.rank:
            self.metrics_name = f"metrics.rank{coordinator.world.rank}.jsonl"
        super().__init__(name, folder, strategy, queue_size, checkpoint_every, checkpoint)

    def start(self, loop: asyncio.AbstractEventLoop | None) -> None:
        self.loop = loop

    def partial_writes(self) -> list[Path]:
        """Only this rank's temp files: the others' writes may be in flight (they open the run together)."""
        rank = self.coordinator.world.rank
        return [p for p in super().partial_writes() if (f".rank{rank}." in p.name if rank else ".rank" not in p.name)]

    def check_alive(self) -> None:
        if self.coordinator.lost:
            raise ProtocolError(*SHUTTING_DOWN)
        super().check_alive()

    def save_checkpoint(self) -> None:
        """Every rank's devices' progress to rank 0, which writes the run's one checkpoint (a collective:
        every rank calls it at the same world step)."""
        self.coordinator.checkpoint(self)

    def stop(self) -> None:
        """Stop after the world's final checkpoint (the coordinator ends every run together)."""
        self.request_stop()
        self.coordinator.ended.wait(self.coordinator.config.world.timeout_s + 30)
        self.close_files()

    def close_files(self, observe_end: bool = True) -> None:
        super().close_files(observe_end)


class WorldFederatedPolicy(FederatedPolicy):
    """`FederatedPolicy` whose runs open on every rank at once, through the coordinator."""

    def __init__(self, config: ServerConfig, stopping, budget, coordinator: "Coordinator"):
        super().__init__(config, stopping, budget)
        self.coordinator = coordinator
        coordinator.runs, coordinator.observers = self.runs, self.observers  # the same objects: filled in later

    async def open_run(self, name: str, hello: Hello) -> TrainingRun:
        if self.stopping():
            raise ProtocolError(*SHUTTING_DOWN)
        run = self.runs.get(name) or await self.coordinator.open(name, hello)
        if run.loop is None:  # opened for another rank's device before any of this rank's joined
            run.loop = asyncio.get_running_loop()
        return run

    def stop(self) -> None:
        self.coordinator.request_stop()
        for run in list(self.runs.values()):
            run.stop()


class Coordinator:
    """One rank's trainer of all its federated runs, in steps the whole world takes together."""

    def __init__(self, world, config: ServerConfig):
        self.world, self.config = world, config
        self.cond = threading.Condition()
        self.runs: dict[str, WorldRun] = {}
        self.observers: list = []  # the policy's run observers (TensorBoard, /metrics, the status page)
        self.opening: dict[str, dict] = {}  # run name -> HELLO meta, asked by this rank's devices
        self.waiting: dict[str, list[tuple[asyncio.AbstractEventLoop, asyncio.Future]]] = {}
        self.stop_requested = False
        self.stopping_world = False
        self.ended = threading.Event()
        self.lost = False
        self.error: str | None = None
        self.steps = 0  # world steps taken (all runs)
        self._thread = threading.Thread(target=self._guarded, name=f"world-rank{world.rank}", daemon=True)

    def policy(self, config: ServerConfig, stopping, budget=None) -> WorldFederatedPolicy:
        return WorldFederatedPolicy(config, stopping, budget, self)

    def start(self) -> None:
        self._thread.start()

    def request_stop(self) -> None:
        with self.cond:
            self.stop_requested = True
            self.cond.notify_all()

    async def open(self, name: str, hello: Hello) -> WorldRun:
        """The run `name`, opened on every rank at the next world step."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        with self.cond:
            if self.ended.is_set() or self.stop_requested:
                raise ProtocolError(*SHUTTING_DOWN)
            self.opening.setdefault(name, dict(hello.to_meta(), token=None))
            self.waiting.setdefault(name, []).append((loop, fut))
            self.cond.notify_all()
        return await fut

    # ---- the thread ----

    def _guarded(self) -> None:
        try:
            self._loop()
        except Exception as exc:  # a peer died or a collective failed: this world is over
            self.lost = True
            self.error = f"{type(exc).__name__}: {exc}"
            log.error("rank %d: world lost (%s); no checkpoint after the last one", self.world.rank, self.error)
            for run in list(self.runs.values()):
                run.request_stop()
                run.close_files()
        finally:
            self.ended.set()
            self._answer_waiters(None, ProtocolError(*SHUTTING_DOWN))

    def _has_news(self) -> bool:
        return bool(self.opening or self.stop_requested or any(
            run.strategy.pending or any(m.queue for m in list(run.members.values())) for run in self.runs.values()))

    def _loop(self) -> None:
        busy = False
        waited: dict[str, float] = {}  # per run: the world steps' waits since it last stepped
        while True:
            t0 = time.perf_counter()
            with self.cond:
                if not busy:
                    self.cond.wait_for(self._has_news, timeout=self.config.world.tick_s)
                opening, stopping = dict(self.opening), self.stop_requested
            runs = sorted(self.runs.items())
            taken = {name: run.take() for name, run in runs}
            mine = {"open": opening, "stop": stopping, "runs": {
                name: {"n": len(w.item.batch.sample_ids) if w else 0, "tokens": w.item.batch.n_tokens if w else 0,
                       "family": w.member.family if w else None, "new": run.strategy.take_new_families(),
                       "queued": sum(len(m.queue) for m in list(run.members.values()))}
                for (name, run), w in zip(runs, taken.values())}}
            everyone = self._gather(mine)
            wait = time.perf_counter() - t0  # for work here, then for the other ranks
            if any(e["stop"] for e in everyone) and not self.stopping_world:
                self.stopping_world = True  # one rank stopping stops the world (all checkpoint together)
                for run in self.runs.values():
                    run.request_stop()
            busy = False
            for name in sorted(mine["runs"]):
                infos = [e["runs"][name] for e in everyone]
                run = self.runs[name]
                run.strategy.add_families([f for i in infos for f in i["new"]])
                contributions = [Contribution(i["family"], i["n"], i["tokens"]) for i in infos]
                waited[name] = waited.get(name, 0.0) + wait
                if sum(c.rows for c in contributions):
                    w = taken[name]
                    run.train(WorldWork(w and w.member, w and w.item, contributions=contributions), waited.pop(name))
                    self.steps += 1
                    busy = True
                busy = busy or any(i["queued"] for i in infos)
            self._open_asked(everyone)
            if self.stopping_world and not busy:
                for name in sorted(self.runs):
                    self.runs[name].save_checkpoint()
                return

    def _gather(self, obj) -> list:
        out = [None] * self.world.size
        dist.all_gather_object(out, obj)
        return out

    def all_reduce(self, tensor: torch.Tensor) -> None:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)

    def _open_asked(self, everyone: list) -> None:
        """Open (on every rank, in name order) the runs any rank's devices asked for."""
        asked: dict[str, dict] = {}
        for e in everyone:
            for name, meta in e["open"].items():
                asked.setdefault(name, meta)
        for name in sorted(asked):
            with self.cond:
                self.opening.pop(name, None)
            if self.stopping_world:
                self._answer_waiters(name, ProtocolError(*SHUTTING_DOWN))
                continue
            if name not in self.runs:
                try:
                    self.runs[name] = run = self._create(name, Hello.from_meta(asked[name]))
                except ProtocolError as exc:  # the same on every rank (the same files): the run stays closed
                    self._answer_waiters(name, exc)
                    continue
                run.observers.extend(make(run) for make in self.observers)
            self._answer_waiters(name, self.runs[name])

    def _create(self, name: str, hello: Hello) -> WorldRun:
        cfg = self.config
        folder = Path(cfg.runs_dir) / name
        checkpoint = load_checkpoint(folder) if check_new_run(folder, cfg) else None
        if checkpoint is not None and checkpoint["progress"].get("world_size", 1) != self.world.size:
            raise ProtocolError("world_mismatch", f"run {name} was trained by a world of "
                                                  f"{checkpoint['progress'].get('world_size', 1)} ranks, this world "
                                                  f"has {self.world.size}")
        strategy = WorldFederated(name, folder, cfg, hello, checkpoint, self)
        return WorldRun(name, folder, strategy, cfg.queue_size, cfg.checkpoint_every, checkpoint, self)

    def _answer_waiters(self, name: str | None, result) -> None:
        with self.cond:
            names = list(self.waiting) if name is None else [name]
            waiters = [w for n in names for w in self.waiting.pop(n, [])]
        for loop, fut in waiters:
            setter = fut.set_exception if isinstance(result, Exception) else fut.set_result
            try:
                loop.call_soon_threadsafe(lambda f=fut, s=setter: f.done() or s(result))
            except RuntimeError:  # the loop has closed
                pass

    def checkpoint(self, run: WorldRun) -> None:
        """Every rank's devices' progress to rank 0, which writes the run's one checkpoint."""
        progress = {"step": run.step, "samples_trained": run.samples_trained, "world_size": self.world.size}
        state = run.strategy.state_dict(progress, run)
        devices = self._gather({d.device_id: state["devices"][d.device_id] for d in list(run.members.values())})
        if self.world.rank == 0:
            for live in devices:  # a device's own rank knows its progress; the rest is from the last checkpoint
                state["devices"].update(live)
            write_checkpoint(run.folder, state)
