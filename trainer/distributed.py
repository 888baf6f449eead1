"""A trainer of several ranks on torch.distributed, launched by torchrun (docs/scale_out.md).

    torchrun --nproc-per-node 2 -m mobillm.trainer.cli serve --port 8765 [--federated] [--resume]

Every rank is a whole `TrainerServer` on `--port + rank`. A HELLO to any rank is placed by a
stable hash of (run, device id) (`World.owner`); a device that reached another rank gets a WELCOME
whose `redirect` names its rank's URL, and connects there (a reconnect asks again and lands on the
same rank). What the ranks share:

- independent (single-device) runs: nothing; each run lives on the rank that owns its device;
- federated runs: one shared side network per task, trained data-parallel in lockstep by
  `world_fed.Coordinator` (gradients all-reduced, weighted by the samples each rank contributed).

The process group (gloo on CPU, nccl on CUDA) is made from torchrun's environment. A rank that
loses the world (a peer killed, a collective timed out) writes no checkpoint and exits 1, so
torchrun (`--max-restarts`) restarts the whole world, which resumes from the last checkpoint.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import os
import signal
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from mobillm.common.errors import BadInput, CheckFailed
from mobillm.common.messages import Hello

from .config import ConfigError, ServerConfig, atomic_write

log = logging.getLogger("mobillm.trainer")

WORLD_FILE = "world.json"  # in --runs: the world size the runs there were trained with


@dataclass(frozen=True)
class World:
    """This process's place in the world (torchrun's RANK, WORLD_SIZE, LOCAL_RANK)."""

    rank: int
    size: int
    local_rank: int = 0

    @classmethod
    def from_env(cls, env=None) -> "World | None":
        """The world torchrun describes, or None when this process was not launched by it."""
        env = os.environ if env is None else env
        if "WORLD_SIZE" not in env:
            return None
        try:
            world = cls(int(env.get("RANK", "0")), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0")))
        except ValueError:
            raise BadInput(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers, got {env.get('RANK')!r} / "
                           f"{env.get('WORLD_SIZE')!r} / {env.get('LOCAL_RANK')!r}") from None
        if not 0 <= world.rank < world.size:
            raise BadInput(f"RANK {world.rank} is outside a world of WORLD_SIZE {world.size}")
        return world

    def owner(self, run: str, device_id: str) -> int:
        """The rank that trains `device_id`'s batches for `run`: the same on every rank, every restart."""
        return owner_rank(run, device_id, self.size)

    def port(self, config: ServerConfig, rank: int | None = None) -> int:
        return config.port + (self.rank if rank is None else rank)

    def url(self, config: ServerConfig, rank: int) -> str:
        """Where a device owned by `rank` connects (--rank-url, or this host and that rank's port)."""
        port = self.port(config, rank)
        if config.world.rank_url:
            return config.world.rank_url.format(rank=rank, port=port)
        return f"{'wss' if config.certfile else 'ws'}://{config.host}:{port}/"

    def redirect_for(self, hello: Hello, config: ServerConfig) -> str | None:
        """The URL of the rank that owns this HELLO's device, or None when it is this rank.
        A single-device run is placed by its name alone: every HELLO naming it meets on one rank,
        which refuses a second device (run_mismatch) as a single process does, instead of two ranks
        training two devices into one run folder."""
        run = run_of(hello, config.federated)
        owner = self.owner(run, hello.device_id if config.federated else "")
        return None if owner == self.rank else self.url(config, owner)


def owner_rank(run: str, device_id: str, size: int) -> int:
    """sha256 of (run, device): stable across processes and restarts (Python's hash() is salted)."""
    digest = hashlib.sha256(f"{run}\0{device_id}".encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") % size


def run_of(hello: Hello, federated: bool) -> str:
    """The run a HELLO feeds (as the policies name it)."""
    return (hello.run or f"fed-{hello.task}") if federated else hello.run_name


def check_world_file(runs_dir: str | Path, size: int, resume: bool) -> None:
    """--resume of runs trained by a world of another size: BadInput naming both sizes. Folders without
    the file (a single-process trainer's) resume only in a world of 1."""
    path = Path(runs_dir) / WORLD_FILE
    if not resume or not Path(runs_dir).is_dir():
        return
    saved = json.loads(path.read_text())["world_size"] if path.is_file() else None
    if saved is None:
        if size > 1 and any(Path(runs_dir).glob("*/checkpoint.pt")):
            raise BadInput(f"{runs_dir} holds runs of a single-process trainer (world size 1); this world has "
                           f"{size} ranks: resume them with one rank, or use another --runs")
        return
    if int(saved) != size:
        raise BadInput(f"{runs_dir} was trained by a world of {saved} ranks, this world has {size}; restart "
                       f"with --nproc-per-node {saved} (x nodes) to resume, or use another --runs")


def write_world_file(runs_dir: str | Path, size: int) -> None:
    Path(runs_dir).mkdir(parents=True, exist_ok=True)
    atomic_write(Path(runs_dir) / WORLD_FILE, (json.dumps({"world_size": size}) + "\n").encode())


def check_config(config: ServerConfig, world: World) -> None:
    """What a world cannot do, refused before any rank binds its port."""
    if config.port == 0:
        raise ConfigError("--port 0 picks a random port per rank, so no rank could redirect to another; "
                          "give the base port (rank R listens on --port + R)")
    if world.size > 1 and not config.world.rank_url and config.host in ("0.0.0.0", "::", ""):
        raise ConfigError(f"--host {config.host!r} binds every interface, so it is no address a device can be "
                          f"redirected to; give --rank-url (e.g. 'wss://trainer.example.com:{{port}}/')")
    if config.federated and config.optim.precision == "fp16" and world.size > 1:
        raise ConfigError("fp16 training (--precision fp16, also set by --profile paper) is not supported by a "
                          "federated world of several ranks: each rank's loss scaler would skip different steps; "
                          "add --precision bf16 (or fp32)")


def init_process_group(config: ServerConfig, world: World) -> None:
    """gloo on CPU, nccl on CUDA (one GPU per local rank when --device cuda names none)."""
    backend = "gloo"
    if config.device.startswith("cuda"):
        backend = "nccl"
        device = config.device if ":" in config.device else f"cuda:{world.local_rank}"
        torch.cuda.set_device(torch.device(device))
    dist.init_process_group(backend, rank=world.rank, world_size=world.size,
                            timeout=datetime.timedelta(seconds=config.world.timeout_s))


def serve_world(config: ServerConfig, world: World) -> None:
    """`trainer serve` as one rank of a torchrun world: until SIGTERM / Ctrl-C, or until the world
    ends (another rank stopped: exit 0) or is lost (CheckFailed, exit 1: torchrun restarts it)."""
    from .server import TrainerServer
    from .world_fed import Coordinator

    check_config(config, world)
    check_world_file(config.runs_dir, world.size, config.resume)
    if config.device == "cuda":
        config = dataclasses.replace(config, device=f"cuda:{world.local_rank}")
    config = dataclasses.replace(config, port=world.port(config))
    init_process_group(config, world)
    if world.rank == 0:
        write_world_file(config.runs_dir, world.size)
    dist.barrier()  # every rank sees the world file rank 0 checked and wrote
    coordinator = Coordinator(world, config) if config.federated else None
    server = TrainerServer(config, world=world, coordinator=coordinator)
    stop = threading.Event()

    def on_signal(*_):
        log.info("rank %d: stopping (checkpoint, devices told to reconnect later)", world.rank)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.start()
    log.info("rank %d of %d serving on %s", world.rank, world.size, server.url)
    if coordinator is not None:
        coordinator.start()
    while not stop.wait(0.2):
        if coordinator is not None and coordinator.ended.is_set():
            break
    server.stop()
    lost = coordinator is not None and coordinator.lost
    if not lost:
        try:
            dist.destroy_process_group()
        except Exception as exc:  # a peer already gone: nothing left to tear down cleanly
            log.info("rank %d: process group teardown: %s", world.rank, exc)
    if lost:
        raise CheckFailed(f"rank {world.rank} lost the world ({coordinator.error}); no checkpoint was written "
                          f"after the last one: restart the whole world with --resume (torchrun --max-restarts "
                          f"does this)")
