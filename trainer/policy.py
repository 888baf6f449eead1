"""Run policies: which run a session's HELLO feeds, and how that run is opened, resumed and joined.

The server's message loop (`server.py`) is the same for every run kind, and so is the training
loop (`training.TrainingRun`); a policy decides which run a HELLO feeds and opens it with its
strategy, as a Flower server is started with its `Strategy`:

- `SingleDevicePolicy` (the default): one run per (task, engine) or per explicit run name, fed by
  exactly one device at a time, with the trivial strategy `run.SingleDevice`; a reconnect of that
  device takes over.
- `FederatedPolicy` (`trainer serve --federated`): one run per task (`fed-<task>` or the HELLO's
  run), fed by many devices and backbones at once, with the strategy `federated.Federated`.

`join` returns a `Membership`: the session's handle on its run (receive a BATCH, finish on DONE,
leave on close) plus the state the WELCOME reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

from mobillm.common import wire
from mobillm.common.messages import (NAME_RULE, RUN_EXISTS, TOO_MANY_RUNS, FedWelcome, Hello, ProtocolError,
                                     TrainingDone, is_name)
from mobillm.common.taps import TapSpec

from . import budget as mem
from .config import RunConfig, ServerConfig
from .core import CHECKPOINT, METRICS, Link, load_checkpoint, open_metrics
from .federated import Device, Federated
from .protocol import Credits
from .run import TRAINED_IDS, SingleDevice
from .training import SHUTTING_DOWN, TrainingRun

log = logging.getLogger("mobillm.trainer")

@dataclass(frozen=True)
class Joined:
    """What the WELCOME tells a device that joined a run."""

    run: str
    samples_done: int  # resume point in the device's sample order
    cache: bool
    stop_streaming: bool
    total_samples: int
    federated: FedWelcome | None = None


class SessionLink(Link, Protocol):
    """The connection a policy attaches to a run (trainer/server.py's `Session`; typed here, not
    imported, so policy.py and server.py do not import each other)."""

    credits: Credits  # its flow control (set when attached to a run, spent by its BATCHes)


class Membership(Protocol):
    """One session's handle on the run it feeds."""

    joined: Joined

    def receive(self, frame: wire.Frame, nbytes: int) -> None:
        """A BATCH from the session: validate, count, queue (raises ProtocolError to end the session)."""

    async def finish(self) -> tuple[dict, bytes, TrainingDone]:
        """DONE from the device: train what it sent, then the MODEL meta, the ONNX file and the DONE reply."""

    def leave(self) -> None:
        """The session closed: the run stops counting on it."""


class RunPolicy(Protocol):
    """How sessions map onto runs."""

    async def join(self, session: SessionLink, hello: Hello) -> Membership:
        """Open or resume the HELLO's run and attach the session to it (credits set on the session)."""

    def stop(self) -> None:
        """Stop every run (each checkpoints unfinished work)."""

    async def release_idle(self, idle_s: float) -> int:
        """Checkpoint and release the runs idle for `idle_s` seconds (restored on their next HELLO);
        returns how many were released."""


def check_pooling(config: ServerConfig, hello: Hello) -> None:
    if config.side.pooling == "mean" and hello.mode == "pooled":
        raise ProtocolError("bad_hello", "pooled mode sends one token per sample, but this server pools "
                                         "with a masked mean over all tokens; use mode 'tokens' or 'summary'")


def run_side_config(config: ServerConfig, hello: Hello):
    """The side network of a new single-device run: the server's template for the HELLO's taps;
    summary rows (the last token and the tokens' mean) are always read through mean pooling."""
    side = config.side.for_taps([t.hidden for t in hello.taps], hello.out_dim)
    return replace(side, pooling="mean") if hello.mode == "summary" else side


def check_new_run(folder: Path, config: ServerConfig, released: bool = False, refused: set | None = None) -> bool:
    """True when `folder` holds a checkpoint to resume: with --resume, or a run this server released
    when it went idle. Otherwise it is refused (`refuse_without_resume`; `refused`: the folders
    already cut back and logged)."""
    if not (folder / CHECKPOINT).is_file():
        return False
    if not (config.resume or released):
        refuse_without_resume(folder, set() if refused is None else refused)
    return True


def refuse_without_resume(folder: Path, refused: set) -> None:
    """The server restarted without --resume: cut trained_ids.jsonl and metrics.jsonl back to the
    checkpoint (a crash leaves steps after it, which its model never kept), tell the operator how to
    resume (once per run), and end the session with ERROR `run_exists` saying what happened."""
    try:
        progress = load_checkpoint(folder, mmap=True)["progress"]
        step, samples = int(progress["step"]), int(progress["samples_trained"])
    except Exception as exc:  # unreadable: say so, cut nothing
        raise ProtocolError(RUN_EXISTS, f"run {folder.name!r} has a checkpoint this server cannot read "
                                        f"({type(exc).__name__}) and was started without --resume; send another "
                                        f"run name") from None
    if str(folder) not in refused:
        refused.add(str(folder))
        for name in (TRAINED_IDS, METRICS):
            if (folder / name).is_file():
                open_metrics(folder / name, step).close()
        log.warning("run %s has a checkpoint at step %d (%d samples) but this server was started without "
                    "--resume, so its device was refused; restart with `trainer serve --resume` (same --runs) to "
                    "continue it", folder.name, step, samples)
    raise ProtocolError(RUN_EXISTS, f"run {folder.name!r} has a checkpoint (step {step}, {samples} samples "
                                      f"trained) but the server was restarted without --resume, so it is kept, "
                                      f"not continued; ask the operator to restart it with --resume, or send "
                                      f"another run name to start over")


class RunTable:
    """The runs a policy opened, by name; opening one is serialised per name. Each open run holds a
    reservation of the server's memory budget; an idle one is checkpointed and released."""

    forget_untrained = False  # release a run that never trained a step by removing its folder

    def __init__(self, config: ServerConfig, stopping, budget: mem.MemoryBudget | None = None):
        self.config, self.stopping = config, stopping  # stopping(): the server is shutting down
        self.budget = budget or mem.MemoryBudget(mem.default_budget())
        self.runs: dict = {}
        self.reservations: dict[str, mem.Reservation] = {}
        self.released: set[str] = set()  # names released when idle: resumed on their next HELLO
        self.refused: set[str] = set()  # folders refused without --resume (cut back and logged once)
        self._locks: dict[str, list] = {}  # name -> [lock, holders and waiters]
        self.observers: list = []  # `make(run) -> observer` for each new run (training.TrainingRun.observers)

    def stop(self) -> None:
        runs = list(self.runs.values())
        for run in runs:  # every run refuses batches at once; then each drains its queue and checkpoints
            run.request_stop()
        for run in runs:
            run.stop()

    @contextlib.asynccontextmanager
    async def lock(self, name: str):
        """Hold run `name`'s lock (opening and releasing a run is serialised per name). Its entry goes
        when nobody holds or awaits it, so run names that come and go leave nothing behind."""
        entry = self._locks.setdefault(name, [asyncio.Lock(), 0])
        entry[1] += 1
        try:
            async with entry[0]:
                yield
        finally:
            entry[1] -= 1
            if entry[1] == 0:
                del self._locks[name]

    async def open_locked(self, name: str, hello: Hello, create, cost: int = 0):
        """The run `name`, made by `create(name, hello)` in an executor (it reads files) and started when new,
        once `cost` bytes of the memory budget are reserved for it. Call it holding `lock(name)`."""
        if self.stopping():
            raise ProtocolError(*SHUTTING_DOWN)
        run = self.runs.get(name)
        if run is None:
            reservation = self.budget.reserve(cost, f"run {name!r} (side network, gradients, optimizer)")
            try:
                run = await asyncio.get_running_loop().run_in_executor(None, create, name, hello)
            except BaseException:
                reservation.release()
                raise
            if self.stopping():
                run.stop()
                reservation.release()
                raise ProtocolError(*SHUTTING_DOWN)
            self.runs[name] = run
            run.observers.extend(make(run) for make in self.observers)
            self.reservations[name] = reservation
            run.start(asyncio.get_running_loop())
        return run

    async def release_idle(self, idle_s: float) -> int:
        cutoff = time.monotonic() - idle_s
        released = 0
        for name, run in list(self.runs.items()):
            since = run.idle_since()
            if since is None or since > cutoff:
                continue
            async with self.lock(name):
                if self.runs.get(name) is not run or run.idle_since() is None:
                    continue  # a HELLO took it meanwhile
                self.released.add(name)
                del self.runs[name]
                await asyncio.get_running_loop().run_in_executor(None, run.stop)  # trains nothing more, checkpoints
                self.reservations.pop(name).release()
                released += 1
                if self.forget_untrained and run.step == 0 and run.samples_trained == 0:
                    # A HELLO without data leaves nothing on disk: 10,000 run names are not 10,000 folders.
                    self.released.discard(name)
                    await asyncio.get_running_loop().run_in_executor(None, shutil.rmtree, run.folder, True)
                    log.info("run %s: idle for %g s before its first step, released and its folder removed",
                             name, idle_s)
                    continue
                log.info("run %s: idle for %g s, checkpointed and released (step %d); its next HELLO restores it",
                         name, idle_s, run.step)
        if released:
            await asyncio.get_running_loop().run_in_executor(None, mem.return_freed_memory)
        return released


def check_folder_count(runs_dir: Path, cap: int) -> None:
    """ERROR `too_many_runs` when `runs_dir` already holds `cap` folders: trained runs keep their folder
    (checkpoint, model) until the operator archives them, so the disk is bounded by this cap."""
    with os.scandir(runs_dir) as entries:
        held = sum(1 for e in entries if e.is_dir(follow_symlinks=False))
    if held >= cap:
        log.warning("refused a new run: %s holds %d run folders (--max-run-folders %d); archive finished runs",
                    runs_dir, held, cap)
        raise ProtocolError(TOO_MANY_RUNS, f"the server holds {held} run folders, its --max-run-folders; it takes "
                                           f"no new run names now; continue one of your runs or ask the operator")


def remove_new_folder(folder: Path, existed: bool) -> None:
    """A run that failed to start leaves nothing behind when its folder is new."""
    if not existed:
        shutil.rmtree(folder, ignore_errors=True)


# ---- one device per run ----

class SingleMember:
    """A session feeding a single-device run; it is replaced when the same device connects again."""

    def __init__(self, run: TrainingRun, session: SessionLink):
        self.run, self.session = run, session
        self.strategy: SingleDevice = run.strategy
        member = self.strategy.member
        cfg = self.strategy.cfg
        self.joined = Joined(cfg.run, member.trained, cfg.cache, session.credits.stopped, cfg.total_samples)

    def receive(self, frame: wire.Frame, nbytes: int) -> None:
        self.run.receive(self.strategy.member, self.session, frame, nbytes)

    async def finish(self) -> tuple[dict, bytes, TrainingDone]:
        run = self.run
        if self.strategy.member.session is not self.session:
            raise ProtocolError("replaced", "a newer connection of this device took over the run")
        run.end_stream(self.strategy.member)
        await run.wait_until(lambda: run.phase in ("finished", "failed"))
        if run.phase == "failed":
            raise ProtocolError("training_failed", run.error or "training failed")
        if run.phase != "finished":
            raise ProtocolError(*SHUTTING_DOWN)
        done = TrainingDone(run.samples_trained, run.step)
        return self.strategy.model_meta().to_meta(), self.strategy.onnx_path.read_bytes(), done

    def leave(self) -> None:
        self.run.detach(self.strategy.member, self.session)


class SingleDevicePolicy(RunTable):
    """One run per run name, one device feeding it (`run.SingleDevice`)."""

    forget_untrained = True  # its folder holds only its own HELLO: the next one makes the same run again

    async def join(self, session: SessionLink, hello: Hello) -> SingleMember:
        """The run for this HELLO (created, resumed or taken over), drained so its resume point is exact."""
        name = hello.run_name
        async with self.lock(name):
            known = name in self.runs
            if not known:
                self.check_runs_per_client(hello)
            run: TrainingRun = await self.open_locked(name, hello, self._open_run,
                                                      0 if known else self.run_cost(hello))
            if known:
                check_identity(run.strategy.cfg, hello)
            run.check_alive()
            await run.attach(run.strategy.member, session)
            return SingleMember(run, session)

    def check_runs_per_client(self, hello: Hello) -> None:
        """ERROR `too_many_runs` when the HELLO's device already holds --max-runs-per-client open runs."""
        held = sum(1 for run in self.runs.values() if run.strategy.cfg.device_id == hello.device_id)
        if held >= self.config.max_runs_per_client:
            raise ProtocolError(TOO_MANY_RUNS, f"device {hello.device_id!r} already holds {held} open runs (the "
                                                 f"server's --max-runs-per-client); finish one, or wait "
                                                 f"{self.config.idle_timeout_s:g} s after leaving one")

    def run_cost(self, hello: Hello) -> int:
        return mem.run_cost(self.config.side, hello)

    def _open_run(self, name: str, hello: Hello) -> TrainingRun:
        """A new run, or (with --resume, or released when idle) the one in runs/<run>/ (runs in an
        executor: it may read files). A new run that fails to start leaves no folder behind."""
        cfg = self.config
        folder = Path(cfg.runs_dir) / name
        existed = folder.exists()
        try:
            return self._make_run(name, hello, folder)
        except BaseException:
            remove_new_folder(folder, existed)
            raise

    def _make_run(self, name: str, hello: Hello, folder: Path) -> TrainingRun:
        cfg = self.config
        checkpoint = None
        if check_new_run(folder, cfg, name in self.released, self.refused):
            run_cfg = RunConfig.load(folder)
            check_identity(run_cfg, hello)
            checkpoint = load_checkpoint(folder)
        else:
            if cfg.cache and hello.formats() is None:
                raise ProtocolError("bad_hello", "this server caches taps (--cache), which needs one format per "
                                                 "tap; send bits 'engine' or fixed formats instead of 'auto'")
            check_pooling(cfg, hello)
            if not folder.exists():
                check_folder_count(Path(cfg.runs_dir), cfg.max_run_folders)
            run_cfg = RunConfig(
                run=name, task=hello.task, task_type=hello.task_type, num_labels=hello.num_labels,
                model_id=hello.model_id, manifest_sha256=hello.manifest_sha256, device_id=hello.device_id,
                mode=hello.mode, epochs=hello.epochs, samples_per_epoch=hello.samples_per_epoch,
                taps=[TapSpec(**t.to_meta()) for t in hello.taps], cache=cfg.cache, bits=hello.bits,
                side=run_side_config(cfg, hello), optim=cfg.optim)
            folder.mkdir(parents=True, exist_ok=True)
            run_cfg.save(folder)
        strategy = SingleDevice(run_cfg, folder, cfg.device, cfg.bitplan_every, checkpoint)
        return TrainingRun(name, folder, strategy, cfg.queue_size, cfg.checkpoint_every, checkpoint)


def check_identity(cfg: RunConfig, hello: Hello) -> None:
    """A reconnecting device must repeat the HELLO the run was started with."""
    saved = {"task": cfg.task, "task_type": cfg.task_type, "num_labels": cfg.num_labels, "model_id": cfg.model_id,
             "manifest_sha256": cfg.manifest_sha256, "mode": cfg.mode, "taps": [t.to_meta() for t in cfg.taps],
             "epochs": cfg.epochs, "samples_per_epoch": cfg.samples_per_epoch, "device_id": cfg.device_id,
             "bits": cfg.bits}
    for key, value in hello.identity().items():
        if saved[key] != value:
            raise ProtocolError("run_mismatch", f"run {cfg.run!r} was started with {key}={saved[key]!r}, the HELLO "
                                                f"says {value!r}; send another run name to start a new run")


# ---- many devices per run ----

class FedMember:
    """A session feeding a federated run as one of its devices."""

    def __init__(self, run: TrainingRun, dev: Device, session: SessionLink):
        self.run, self.dev, self.session = run, dev, session
        self.strategy: Federated = run.strategy
        family = self.strategy.model.families[dev.family]
        slots = self.strategy.fed.slots
        self.joined = Joined(run.name, dev.trained, False, session.credits.stopped, dev.limit, FedWelcome(
            dev.family, family.slots(slots), slots, len(run.members)))

    def receive(self, frame: wire.Frame, nbytes: int) -> None:
        self.run.receive(self.dev, self.session, frame, nbytes)

    async def finish(self) -> tuple[dict, bytes, TrainingDone]:
        """DONE: train the device's FIFO, then export the shared body + its alignment for it."""
        run = self.run
        run.end_stream(self.dev)
        await run.wait_until(self.dev.drained)
        run.check_alive()
        onnx_bytes, meta = await asyncio.get_running_loop().run_in_executor(None, self.strategy.export_for,
                                                                            self.dev, run)
        return meta, onnx_bytes, TrainingDone(self.dev.trained, meta["federated"]["step"])

    def leave(self) -> None:
        self.run.detach(self.dev, self.session)


class FederatedPolicy(RunTable):
    """One federated run per task for every device that sends it (created on first use)."""

    async def join(self, session: SessionLink, hello: Hello) -> FedMember:
        name = hello.run or f"fed-{hello.task}"
        if not is_name(name):
            raise ProtocolError("bad_hello", f"run {name!r}: a run name is {NAME_RULE}; send a shorter run name")
        check_pooling(self.config, hello)
        run = await self.open_run(name, hello)
        dev = await run.strategy.join(run, session, hello)
        return FedMember(run, dev, session)

    async def open_run(self, name: str, hello: Hello) -> TrainingRun:
        """The federated run `name`, opened (or resumed) on first use, its memory reserved first."""
        async with self.lock(name):
            cost = 0 if name in self.runs else mem.run_cost(replace(self.config.side, side_width=self.config.fed.width),
                                                            hello)
            return await self.open_locked(name, hello, self._create, cost)

    def snapshot(self, run: str, device_id: str):
        """The model `device_id` of federated run `run` would get back now (see Federated.snapshot),
        or None when either is not there yet."""
        training = self.runs.get(run)
        dev = None if training is None else training.members.get(device_id)
        return None if dev is None else training.strategy.snapshot(dev)

    def _create(self, name: str, hello: Hello) -> TrainingRun:
        cfg = self.config
        folder = Path(cfg.runs_dir) / name
        resume = check_new_run(folder, cfg, name in self.released, self.refused)
        checkpoint = load_checkpoint(folder) if resume else None
        strategy = Federated(name, folder, cfg, hello, checkpoint)
        return TrainingRun(name, folder, strategy, cfg.queue_size, cfg.checkpoint_every, checkpoint)
