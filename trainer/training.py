"""The one training loop every run shares; a `Strategy` object decides what differs between run kinds.

As a Flower server loop asks its `Strategy` which clients train next (`configure_fit`) and folds
their results in (`aggregate_fit`), a `TrainingRun` owns the mechanics and asks its strategy:

- the run (here): the members (devices feeding it) and their FIFOs of received batches, batch
  admission, credits, the wait for work, stop (batches already queued are trained, then a
  checkpoint) and failure, when checkpoints are written, the metrics.jsonl record;
- the strategy: which member's head batch trains next (`pick`), work of its own when none is due
  (`idle_work`: a cached epoch's rows, or `END`: training is complete), what one step trains at
  which learning rate (`fit`), what the step changes and logs besides the common fields
  (`aggregate`), the checkpoint's contents (`state_dict`) and the run's end (`finish`).

`run.SingleDevice` is the trivial strategy: one member, its cached epochs, `WarmupLinear`, export
at the end. `federated.Federated` schedules many members under a share cap, with sqrt decay, and
exports a snapshot for each member on its DONE.

Threads. The server's asyncio loop calls `attach`, `receive`, `end_stream` and `detach`; the
run's training thread runs the loop and reports back with `deliver` / `notify`; `cond` guards the
members, their FIFOs and the counters the loop side reads. A run of a world of ranks has no thread
of its own: `world_fed.Coordinator` takes its batches (`take`) and trains them (`train`) in steps
every rank takes together, so the step, its record and its checkpoints are still this module's.

Every step writes one `StepRecord` to metrics.jsonl, with the same fields whatever the run kind.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import traceback
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Protocol

from mobillm.common import wire
from mobillm.common.messages import BitPlan, ProtocolError

from .core import METRICS, Link, Step, append_record, check_finite, open_metrics, write_checkpoint
from .data import Rows
from .protocol import accept_batch, trim_batch

log = logging.getLogger("mobillm.trainer")

SHUTTING_DOWN = ("shutting_down", "the server is stopping; reconnect later to resume")
END = object()  # `Strategy.idle_work`: training is complete; `finish` ends the run


@dataclass
class Item:
    """A validated batch in its member's FIFO."""

    batch: wire.Batch
    nbytes: int
    session: Link  # the session that sent it: its credit goes back there
    arrived_step: int  # optimizer step when it arrived (staleness = steps it waited)
    release: Callable[[], None] | None = None  # gives its bytes back to the session's memory share


@dataclass
class Member:
    """One device feeding a run. FIFO and counters are guarded by the run's `cond`."""

    device_id: str
    limit: int  # samples the device streams: every epoch, or the first one when the server caches
    cached: bool = False  # later epochs come from the server's cache: samples past `limit` are dropped
    session: Link | None = None
    queue: deque = field(default_factory=deque)
    accepted: int = 0  # samples received (queued or trained) from the device's stream
    trained: int = 0  # samples of the device's stream trained: its resume point
    in_step: bool = False
    done: bool = False  # the stream is over (DONE, or the run left its streaming phase)
    bytes_received: int = 0

    @property
    def streaming(self) -> bool:
        """Connected and still owes batches: a schedule may wait for it."""
        return self.session is not None and not self.done and self.accepted < self.limit

    def drained(self) -> bool:
        return not self.queue and not self.in_step


@dataclass
class Work:
    """What one optimizer step trains: a member's queued batch, or rows the strategy supplies."""

    member: Member | None = None
    item: Item | None = None
    rows: Rows | None = None  # set by the strategy for its own work (a cached epoch's rows)
    source: str = "stream"


@dataclass
class Fit:
    """What `Strategy.fit` trained: this process's step and rows, its learning rate(s) as metric fields,
    and the step's totals. The totals default to this process's; a step of a world of ranks
    (`world_fed`) sets them to every rank's, and has no step or rows on a rank that had none."""

    step: Step | None
    rows: Rows | None
    lr: dict
    samples: int | None = None  # rows trained by the step (all ranks'); None: len(rows)
    tokens: int | None = None  # their tokens; None: the batch's tokens, or the strategy's rows' tokens
    loss: float | None = None  # the step's mean loss over those rows; None: step.loss
    grad_norm: float | None = None  # None: step.grad_norm

    def __post_init__(self):
        if self.samples is None:
            self.samples = len(self.rows)
        if self.loss is None:
            self.loss = self.step.loss
        if self.grad_norm is None:
            self.grad_norm = self.step.grad_norm


@dataclass
class StepRecord:
    """One line of metrics.jsonl, whatever the run kind: every record of every run (one device,
    federated, a world of ranks) has every field, None where the run has no such thing, so readers
    (plot, TensorBoard, the status page, bench/) see one schema. A strategy's `aggregate` fills the
    fields after `queue_depth`; a field it does not declare here is a bug (TypeError)."""

    step: int
    time: float
    samples: int  # trained by the run so far (every rank's)
    rows: int  # trained by this step (every rank's)
    tokens: int
    loss: float
    lr: float
    grad_norm: float
    wait_s: float  # the training thread's wait for this step's work
    step_s: float
    idle_frac: float  # share of the run's time spent waiting for work
    bytes_received: int
    queue_depth: int  # batches queued after the step
    align_lr: float | None = None  # federated: the learning rate of the device family's alignment
    epoch: float | None = None  # one device: epochs trained
    source: str | None = None  # one device: "stream" or "cache"
    samples_per_s: float | None = None  # one device: this step's rows over the time since the last step
    device: str | None = None  # federated: the device whose batch this process trained (None: it had none)
    family: str | None = None
    device_samples: int | None = None
    device_epoch: float | None = None
    staleness: int | None = None  # steps the batch waited in its FIFO
    device_lag: int | None = None  # steps since the device's previous batch trained
    share: float | None = None  # the device's share of the last --share-window samples
    window: int | None = None
    streaming_devices: int | None = None
    rank_rows: int | None = None  # a world of ranks: this rank's rows of the step
    world_rows: list[int] | None = None  # a world of ranks: every rank's rows, in rank order


class Strategy(Protocol):
    """What a `TrainingRun` asks its scheduling policy. `pick`, `idle_work` and `aggregate` are called
    with the run's `cond` held; the rest on the training thread (a world's coordinator) without it."""

    phase: str

    def members(self) -> list[Member]:
        """The members the run starts with (restored from a checkpoint or known in advance)."""

    def pick(self, members: list[Member]) -> Member | None:
        """The member whose head batch trains next; None: no batch is due now."""

    def idle_work(self, run: "TrainingRun") -> Work | object | None:
        """No batch is due: the strategy's own `Work`, `END` (training is complete), or None (wait)."""

    def fit(self, work: Work, run: "TrainingRun") -> Fit:
        """One optimizer step on the work's rows."""

    def aggregate(self, work: Work, fit: Fit, run: "TrainingRun") -> dict:
        """Fold a step in (the run's counters already count it); its `StepRecord` fields beyond the common ones."""

    def bitplan(self, step: int) -> BitPlan | None:
        """A BITPLAN for the members after this step, if one is due."""

    def state_dict(self, progress: dict, run: "TrainingRun") -> dict:
        """The checkpoint; `progress` (step, samples_trained) goes in as its "progress" entry."""

    def finish(self, run: "TrainingRun") -> None:
        """Training is complete (after `END`): final checkpoint, export, summary."""

    def close(self, run: "TrainingRun") -> None:
        """The run stopped (its thread has ended): write what is left, close files."""


def release_item(item: Item) -> None:
    """The batch's step ended (or it will never train): its bytes leave the session's share."""
    release, item.release = item.release, None
    if release is not None:
        release()


class TrainingRun:
    """One run: its members, the thread that trains it and the coroutines on the server's loop that
    wait for it. Waits end on `failed` and `stopped` too."""

    metrics_name = METRICS  # a rank of a world other than 0 logs to its own file (world_fed.WorldRun)

    def __init__(self, name: str, folder: Path, strategy: Strategy, queue_size: int, checkpoint_every: int,
                 checkpoint: dict | None = None):
        self.name, self.folder, self.strategy = name, Path(folder), strategy
        self.queue_size, self.checkpoint_every = queue_size, checkpoint_every
        self.cond = threading.Condition()
        self.members: dict[str, Member] = {m.device_id: m for m in strategy.members()}
        self.step = 0
        self.samples_trained = 0
        self.bytes_received = 0
        if checkpoint is not None:
            self.step = int(checkpoint["progress"]["step"])
            self.samples_trained = int(checkpoint["progress"]["samples_trained"])
            for tmp in self.partial_writes():  # a crash mid-write leaves its temp file; the real file is whole
                tmp.unlink()
        self.error: str | None = None
        self.failed = False
        self.stopped = False  # the thread has ended and the run's files are closed
        self.waiting = False  # the training thread waits for work (the run may be released when idle)
        self.last_active = time.monotonic()  # last attach, detach or batch (loop side)
        self.stop_requested = threading.Event()  # the server is stopping: train what is queued, checkpoint, end
        self.loop: asyncio.AbstractEventLoop | None = None
        self._waiters: list[asyncio.Future] = []
        self._thread = threading.Thread(target=self._guarded_loop, name=f"train-{name}", daemon=True)
        self._closing = threading.Lock()
        self._wait_s = 0.0
        self._t0 = time.perf_counter()
        self._metrics = open_metrics(self.folder / self.metrics_name, self.step if checkpoint is not None else None)
        # Watchers of the run (TensorBoard, /metrics, the status page), called on the training thread:
        # `step(run, record)` after each metrics.jsonl record, `end(run)` when the thread ends.
        self.observers: list = []

    def partial_writes(self) -> list[Path]:
        """Temp files of this run's writers (a rank of a world other than 0 writes only its own files)."""
        return list(self.folder.glob(".*.tmp"))

    @property
    def phase(self) -> str:
        return "failed" if self.failed else self.strategy.phase

    def idle_frac(self) -> float:
        """Share of the run's time the training thread waited for a batch."""
        return self._wait_s / max(time.perf_counter() - self._t0, 1e-9)

    # ---- lifecycle (server) ----

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._thread.start()

    def request_stop(self) -> None:
        """From now on batches are refused; the thread trains those already queued, checkpoints and ends."""
        with self.cond:
            self.stop_requested.set()
            self.cond.notify_all()

    def stop(self) -> None:
        """Stop (`request_stop`) and join the thread, then close the run's files. Safe to call twice."""
        self.request_stop()
        if self._thread.is_alive():
            self._thread.join()
        self.close_files()

    def close_files(self, observe_end: bool = False) -> None:
        """Training has ended: close the run's files and give its queued batches' memory back (a failed
        run leaves batches queued). `observe_end`: tell the observers, for a run without a thread of
        its own. Safe to call twice, from two threads."""
        with self._closing:
            if not self.stopped:
                self.stopped = True
                if observe_end:
                    self._observe("end")
                self._metrics.close()
                self.strategy.close(self)
                with self.cond:
                    for member in self.members.values():
                        while member.queue:
                            release_item(member.queue.popleft())
        self.notify()

    def idle_since(self) -> float | None:
        """When the run became idle (no device attached, nothing queued, the thread waiting or ended),
        or None while it is busy."""
        with self.cond:
            busy = any(m.session is not None or not m.drained() for m in self.members.values())
            if busy or not (self.waiting or not self._thread.is_alive()):
                return None
        return self.last_active

    def check_alive(self) -> None:
        """Raise the ProtocolError a session gets when the run failed or is stopping."""
        if self.failed:
            raise ProtocolError("training_failed", self.error or "training failed")
        if self.stopped or self.stop_requested.is_set():
            raise ProtocolError(*SHUTTING_DOWN)

    # ---- loop side: members ----

    async def attach(self, member: Member, session: Link) -> None:
        """`session` feeds `member` from now on. An older connection of the same device is told it was
        replaced; the batches it queued are trained first, so the resume point (`member.trained`) is exact."""
        with self.cond:
            self.members.setdefault(member.device_id, member)
            old, member.session = member.session, None
            self.last_active = time.monotonic()
            self.cond.notify_all()
        if old is not None and old is not session:
            asyncio.ensure_future(old.fail(ProtocolError("replaced", "a newer connection of this device took over")))
        await self.wait_until(member.drained)
        self.check_alive()
        with self.cond:
            member.accepted = member.trained
            member.session = session
            stopped = member.done or member.accepted >= member.limit  # it owes nothing more: no credit comes back
            self.cond.notify_all()
        session.credits.open(self.queue_size, stopped)

    def detach(self, member: Member, session: Link) -> None:
        """The session closed: the run stops counting on it (its queued batches still train)."""
        with self.cond:
            if member.session is session:
                member.session = None
            self.last_active = time.monotonic()
            self.cond.notify_all()

    def receive(self, member: Member, session, frame: wire.Frame, nbytes: int) -> None:
        """A BATCH from `session`: validated against its HELLO, its credit taken, counted, queued."""
        if member.session is not session:
            raise ProtocolError("replaced", "a newer connection of this device took over the run")
        self.check_alive()
        config = session.server.config
        batch = accept_batch(frame.body, session.hello, session.formats, session.credits, config.max_rows,
                             config.max_tokens)
        self.last_active = time.monotonic()
        member.bytes_received += nbytes
        self.bytes_received += nbytes
        room = member.limit - member.accepted
        if member.done or room < len(batch.sample_ids):
            if not member.cached:
                raise ProtocolError("bad_batch", f"more than epochs x samples_per_epoch = {member.limit} samples")
            if member.done or room <= 0:
                return  # sent before the device saw stop_streaming: later epochs come from the cache
            batch = trim_batch(batch, room)
        release = session.charge(batch, nbytes)  # over_budget when this device's share is full
        with self.cond:
            member.accepted += len(batch.sample_ids)
            member.queue.append(Item(batch, nbytes, session, self.step, release))
            self.cond.notify_all()
        if member.cached and member.accepted >= member.limit and not session.credits.stopped:
            session.stop_streaming(batch.seq, member.trained)

    def end_stream(self, member: Member) -> None:
        """DONE from the member's device: it sends no more batches."""
        with self.cond:
            member.done = True
            self.cond.notify_all()

    # ---- training thread ----

    def _guarded_loop(self) -> None:
        try:
            self._train_loop()
        except Exception as exc:  # the run fails; the server and other runs carry on
            self.error = f"{type(exc).__name__}: {exc}"
            (self.folder / "error.log").write_text(traceback.format_exc())
            log.error("run %s failed: %s", self.name, self.error)
            self.failed = True
        finally:
            if not self.failed and self.strategy.phase != "finished":
                self.save_checkpoint()
            self._observe("end")
            self.notify()

    def _train_loop(self) -> None:
        while True:
            t0 = time.perf_counter()
            work = self._next_work()
            if work is None:
                return
            if work is END:
                self.strategy.finish(self)
                return
            self.train(work, time.perf_counter() - t0)

    def _pick(self) -> Work | None:
        """The head batch of the member the strategy picks, marked in its step (`cond` held), or None."""
        member = self.strategy.pick(list(self.members.values()))
        if member is None:
            return None
        member.in_step = True
        return Work(member, member.queue.popleft())

    def take(self) -> Work | None:
        """The batch due now, without waiting (its credit goes back at once), or None: for a caller
        that schedules the steps itself (`world_fed.Coordinator`) and then calls `train`."""
        with self.cond:
            work = self._pick()
        if work is not None:
            self._credit(work.member, work.item, work.member.trained)
        return work

    def _next_work(self) -> Work | object | None:
        """The next step's work (waiting for it), `END`, or None when a stop leaves nothing queued to train.
        A batch's credit goes back as it leaves the queue."""
        with self.cond:
            while True:
                work = self._pick()
                if work is not None:
                    break
                if self.stop_requested.is_set():
                    return None
                work = self.strategy.idle_work(self)
                if work is not None:
                    return work
                self.waiting = True
                self.cond.wait()
                self.waiting = False
        self._credit(work.member, work.item, work.member.trained)
        return work

    def train(self, work: Work, waited: float) -> None:
        """One step of the loop on `work` after `waited` seconds without any: fit, count, log, give the
        batch's memory back, then a checkpoint and a BITPLAN when due."""
        self._wait_s += waited
        try:
            self._train(work, waited)
        finally:
            if work.item is not None:
                release_item(work.item)
            if work.member is not None:
                with self.cond:
                    work.member.in_step = False
                    self.cond.notify_all()
        if self.step % self.checkpoint_every == 0:
            self.save_checkpoint()
        plan = self.strategy.bitplan(self.step)
        if plan is not None:
            for member in list(self.members.values()):
                self._tell(member, lambda session: session.post_bitplan(plan))
        self.notify()

    def _train(self, work: Work, waited: float) -> None:
        t0 = time.perf_counter()
        fit = self.strategy.fit(work, self)
        with self.cond:
            self.step += 1
            self.samples_trained += fit.samples
            if work.item is not None:
                work.member.trained += len(fit.rows)
            fields = self.strategy.aggregate(work, fit, self)
            queued = sum(len(m.queue) for m in self.members.values())
        tokens = fit.tokens
        if tokens is None:
            tokens = work.item.batch.n_tokens if work.item is not None else int(fit.rows.lengths.sum())
        record = asdict(StepRecord(
            step=self.step, time=time.time(), samples=self.samples_trained, rows=fit.samples, tokens=tokens,
            loss=fit.loss, **fit.lr, grad_norm=fit.grad_norm, wait_s=waited, step_s=time.perf_counter() - t0,
            idle_frac=self.idle_frac(), bytes_received=self.bytes_received, queue_depth=queued, **fields))
        append_record(self._metrics, record)
        self._observe("step", record)
        check_finite(fit.loss, self.step, f" (device {work.member.device_id})" if work.member else "")

    def _observe(self, event: str, *args) -> None:
        """Tell every observer; one that raises is dropped (with a warning), never the run."""
        for observer in list(self.observers):
            try:
                getattr(observer, event)(self, *args)
            except Exception as exc:
                log.warning("run %s: %s observer dropped: %s: %s", self.name, type(observer).__name__,
                            type(exc).__name__, exc)
                self.observers.remove(observer)

    def save_checkpoint(self) -> None:
        """The strategy's checkpoint, written atomically (called by the training thread only)."""
        progress = {"step": self.step, "samples_trained": self.samples_trained}
        write_checkpoint(self.folder, self.strategy.state_dict(progress, self))

    # ---- reaching the server's loop ----

    def _credit(self, member: Member, item: Item, samples_done: int) -> None:
        """The item left the queue: its credit goes back to the session that sent it, if it still feeds the run."""
        def send():
            if member.session is item.session:
                item.session.grant_credit(item.batch.seq, samples_done)

        self.deliver(send)

    def _tell(self, member: Member, call: Callable[[Link], None]) -> None:
        def send():
            if member.session is not None:
                call(member.session)

        self.deliver(send)

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Wait (on the loop) until the training thread makes `predicate` true, or the run stops or fails."""
        while not (predicate() or self.stopped or self.failed):
            fut = self.loop.create_future()
            self._waiters.append(fut)
            if predicate() or self.stopped or self.failed:
                break
            await fut

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    def notify(self) -> None:
        """Thread-safe: wake every waiter on the loop."""
        self.deliver(self._wake)

    def deliver(self, call: Callable[[], None]) -> None:
        """Thread-safe: run `call` on the event loop (dropped once the loop has closed)."""
        if self.loop is not None:
            try:
                self.loop.call_soon_threadsafe(call)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass
