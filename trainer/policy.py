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
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from mobillm.common import wire
from mobillm.common.messages import NAME_RULE, FedWelcome, Hello, ProtocolError, TrainingDone, is_name

from .config import RunConfig, ServerConfig
from .core import CHECKPOINT, load_checkpoint
from .federated import Device, Federated
from .run import SingleDevice
from .training import SHUTTING_DOWN, TrainingRun

if TYPE_CHECKING:
    from .server import Session

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

    async def join(self, session: "Session", hello: Hello) -> Membership:
        """Open or resume the HELLO's run and attach the session to it (credits set on the session)."""

    def stop(self) -> None:
        """Stop every run (each checkpoints unfinished work)."""


def check_pooling(config: ServerConfig, hello: Hello) -> None:
    if config.side.pooling == "mean" and hello.mode == "pooled":
        raise ProtocolError("bad_hello", "pooled mode sends one token per sample, but this server pools "
                                         "with a masked mean over all tokens; use mode 'tokens'")


def check_new_run(folder: Path, config: ServerConfig) -> bool:
    """True when `folder` holds a checkpoint to resume (only with --resume; otherwise it is refused)."""
    if not (folder / CHECKPOINT).is_file():
        return False
    if not config.resume:
        raise ProtocolError("run_exists", f"{folder} already holds a checkpoint; restart the server with "
                                          f"--resume to continue it, or send another run name")
    return True


class RunTable:
    """The runs a policy opened, by name; opening one is serialised per name."""

    def __init__(self, config: ServerConfig, stopping):
        self.config, self.stopping = config, stopping  # stopping(): the server is shutting down
        self.runs: dict = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self.observers: list = []  # `make(run) -> observer` for each new run (training.TrainingRun.observers)

    def stop(self) -> None:
        runs = list(self.runs.values())
        for run in runs:  # every run refuses batches at once; then each drains its queue and checkpoints
            run.request_stop()
        for run in runs:
            run.stop()

    def lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    async def open_locked(self, name: str, hello: Hello, create):
        """The run `name`, made by `create(name, hello)` in an executor (it reads files) and started when new.
        Call it holding `lock(name)`."""
        if self.stopping():
            raise ProtocolError(*SHUTTING_DOWN)
        run = self.runs.get(name)
        if run is None:
            run = await asyncio.get_running_loop().run_in_executor(None, create, name, hello)
            if self.stopping():
                run.stop()
                raise ProtocolError(*SHUTTING_DOWN)
            self.runs[name] = run
            run.observers.extend(make(run) for make in self.observers)
            run.start(asyncio.get_running_loop())
        return run


# ---- one device per run ----

class SingleMember:
    """A session feeding a single-device run; it is replaced when the same device connects again."""

    def __init__(self, run: TrainingRun, session: "Session"):
        self.run, self.session = run, session
        self.strategy: SingleDevice = run.strategy
        member = self.strategy.member
        session.stop_sent = member.done or member.accepted >= member.limit
        cfg = self.strategy.cfg
        self.joined = Joined(cfg.run, member.trained, cfg.cache, session.stop_sent, cfg.total_samples)

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

    async def join(self, session: "Session", hello: Hello) -> SingleMember:
        """The run for this HELLO (created, resumed or taken over), drained so its resume point is exact."""
        name = hello.run_name
        async with self.lock(name):
            known = name in self.runs
            run: TrainingRun = await self.open_locked(name, hello, self._open_run)
            if known:
                check_identity(run.strategy.cfg, hello)
            run.check_alive()
            await run.attach(run.strategy.member, session)
            return SingleMember(run, session)

    def _open_run(self, name: str, hello: Hello) -> TrainingRun:
        """A new run, or (with --resume) the one in runs/<run>/ (runs in an executor: it may read files)."""
        cfg = self.config
        folder = Path(cfg.runs_dir) / name
        checkpoint = None
        if check_new_run(folder, cfg):
            run_cfg = RunConfig.load(folder)
            check_identity(run_cfg, hello)
            checkpoint = load_checkpoint(folder)
        else:
            if cfg.cache and hello.formats() is None:
                raise ProtocolError("bad_hello", "this server caches taps (--cache), which needs one format per "
                                                 "tap; send bits 'engine' or fixed formats instead of 'auto'")
            check_pooling(cfg, hello)
            run_cfg = RunConfig(
                run=name, task=hello.task, task_type=hello.task_type, num_labels=hello.num_labels,
                model_id=hello.model_id, manifest_sha256=hello.manifest_sha256, device_id=hello.device_id,
                mode=hello.mode, epochs=hello.epochs, samples_per_epoch=hello.samples_per_epoch,
                taps=[t.to_meta() for t in hello.taps], cache=cfg.cache, bits=hello.bits,
                side=cfg.side.for_taps([t.hidden for t in hello.taps], hello.out_dim), optim=cfg.optim)
            folder.mkdir(parents=True, exist_ok=True)
            run_cfg.save(folder)
        strategy = SingleDevice(run_cfg, folder, cfg.device, cfg.bitplan_every, checkpoint)
        return TrainingRun(name, folder, strategy, cfg.queue_size, cfg.checkpoint_every, checkpoint)


def check_identity(cfg: RunConfig, hello: Hello) -> None:
    """A reconnecting device must repeat the HELLO the run was started with."""
    saved = {"task": cfg.task, "task_type": cfg.task_type, "num_labels": cfg.num_labels, "model_id": cfg.model_id,
             "manifest_sha256": cfg.manifest_sha256, "mode": cfg.mode, "taps": cfg.taps, "epochs": cfg.epochs,
             "samples_per_epoch": cfg.samples_per_epoch, "device_id": cfg.device_id, "bits": cfg.bits}
    for key, value in hello.identity().items():
        if saved[key] != value:
            raise ProtocolError("run_mismatch", f"run {cfg.run!r} was started with {key}={saved[key]!r}, the HELLO "
                                                f"says {value!r}; send another run name to start a new run")


# ---- many devices per run ----

class FedMember:
    """A session feeding a federated run as one of its devices."""

    def __init__(self, run: TrainingRun, dev: Device, session: "Session"):
        self.run, self.dev, self.session = run, dev, session
        self.strategy: Federated = run.strategy
        family = self.strategy.model.families[dev.family]
        slots = self.strategy.fed.slots
        session.stop_sent = dev.done or dev.accepted >= dev.limit
        self.joined = Joined(run.name, dev.trained, False, session.stop_sent, dev.limit, FedWelcome(
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

    async def join(self, session: "Session", hello: Hello) -> FedMember:
        name = hello.run or f"fed-{hello.task}"
        if not is_name(name):
            raise ProtocolError("bad_hello", f"run {name!r}: a run name is {NAME_RULE}; send a shorter run name")
        check_pooling(self.config, hello)
        run = await self.open_run(name, hello)
        dev = await run.strategy.join(run, session, hello)
        return FedMember(run, dev, session)

    async def open_run(self, name: str, hello: Hello) -> TrainingRun:
        """The federated run `name`, opened (or resumed) on first use."""
        async with self.lock(name):
            return await self.open_locked(name, hello, self._create)

    def snapshot(self, run: str, device_id: str):
        """The model `device_id` of federated run `run` would get back now (see Federated.snapshot),
        or None when either is not there yet."""
        training = self.runs.get(run)
        dev = None if training is None else training.members.get(device_id)
        return None if dev is None else training.strategy.snapshot(dev)

    def _create(self, name: str, hello: Hello) -> TrainingRun:
        cfg = self.config
        folder = Path(cfg.runs_dir) / name
        checkpoint = load_checkpoint(folder) if check_new_run(folder, cfg) else None
        strategy = Federated(name, folder, cfg, hello, checkpoint)
        return TrainingRun(name, folder, strategy, cfg.queue_size, cfg.checkpoint_every, checkpoint)
