"""Typed configuration: validated once, saved as JSON next to every run.

`ServerConfig` is what `trainer serve` is started with. `RunConfig` is one side network's
complete recipe (the device's HELLO + the server's hyperparameters); it is written to
`runs/<run>/config.json` and is enough to rebuild the model for `trainer export`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

ACTIVATIONS = ("relu", "gelu")
POOLINGS = ("last", "mean")


@dataclass
class SideConfig:
    """The side network's architecture (MobiLLM Eq. 5). `tap_widths`/`out_dim` come from the HELLO."""

    tap_widths: list[int] = field(default_factory=list)
    out_dim: int = 0
    side_width: int | None = None  # None: the first tap's width; taps of another width get a Linear projection
    bottleneck: int = 64
    activation: str = "relu"
    pooling: str = "last"  # last real token, or masked mean over real tokens
    init_std: float = 0.02  # W_down ~ N(0, init_std)
    up_init_std: float = 1e-4  # W_up ~ N(0, up_init_std): each adapter starts close to the identity residual
    ln_eps: float = 1e-5

    def validate(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.bottleneck < 1:
            raise ValueError(f"bottleneck must be >= 1, got {self.bottleneck}")
        if self.side_width is not None and self.side_width < 1:
            raise ValueError(f"side_width must be >= 1, got {self.side_width}")
        if self.init_std < 0 or self.up_init_std < 0:
            raise ValueError("init stds must be >= 0")

    def for_taps(self, tap_widths: list[int], out_dim: int) -> "SideConfig":
        """This template completed for one run's taps; the side width is resolved here."""
        return dataclasses.replace(self, tap_widths=list(tap_widths), out_dim=out_dim,
                                   side_width=self.side_width or tap_widths[0])


@dataclass
class OptimConfig:
    """AdamW with linear warm-up and linear decay to zero over the declared samples."""

    lr: float = 1e-3
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_ratio: float = 0.06  # of epochs * samples_per_epoch
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    seed: int = 0  # initialisation and the order of cached epochs
    cache_batch_size: int | None = None  # rows per step in cached epochs; None: the first streamed batch's rows

    def validate(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip must be >= 0, got {self.grad_clip}")
        if self.cache_batch_size is not None and self.cache_batch_size < 1:
            raise ValueError(f"cache_batch_size must be >= 1, got {self.cache_batch_size}")


@dataclass
class RunConfig:
    """One side network: what the device declared, plus how the server trains it."""

    run: str
    task: str
    task_type: str  # "class" | "regression"
    num_labels: int
    model_id: str
    manifest_sha256: str
    device_id: str
    mode: str  # "tokens" | "pooled"
    epochs: int
    samples_per_epoch: int
    taps: list[dict]  # [{"layer", "hidden", "fmt", "block_size"}], as in the HELLO
    cache: bool
    side: SideConfig
    optim: OptimConfig
    bits: str = "engine"  # the HELLO's bits: engine | auto | <fmt> | <fmt>,<fmt>,... (protocol.allowed_formats)

    @property
    def total_samples(self) -> int:
        return self.epochs * self.samples_per_epoch

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "RunConfig":
        data = dict(data)
        optim = dict(data.pop("optim"))
        optim["betas"] = tuple(optim["betas"])
        return cls(side=SideConfig(**data.pop("side")), optim=OptimConfig(**optim), **data)

    def save(self, folder: Path) -> Path:
        path = Path(folder) / "config.json"
        atomic_write(path, (json.dumps(self.to_dict(), indent=2) + "\n").encode())
        return path

    @classmethod
    def load(cls, folder: Path | str) -> "RunConfig":
        path = Path(folder) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found; is {folder} a run folder written by `trainer serve`?")
        return cls.from_dict(json.loads(path.read_text()))


@dataclass
class FedConfig:
    """Federated side-tuning (`trainer serve --federated`): one shared side network per task.

    Every backbone family's taps are aligned to `slots` slots by relative depth and projected to
    `width`; `max_share` caps any one device's share of the last `share_window` trained samples."""

    slots: int = 4  # slot k of the shared network sits at relative depth k / slots
    width: int = 256  # shared side width D, the same for every backbone
    max_share: float = 1.0  # 1: no cap; e.g. 0.5: no device trains more than half of the window
    share_window: int = 512  # samples in the sliding window the share is measured over
    warmup_samples: int = 256  # linear lr warm-up, then lr * sqrt(warmup / samples) (no known end)

    def validate(self) -> None:
        if not 1 <= self.slots <= 256:
            raise ValueError(f"fed slots must be 1..256, got {self.slots}")
        if self.width < 1:
            raise ValueError(f"fed width must be >= 1, got {self.width}")
        if not 0 < self.max_share <= 1:
            raise ValueError(f"max_share must be in (0, 1], got {self.max_share}")
        if self.share_window < 1 or self.warmup_samples < 0:
            raise ValueError("share_window must be >= 1 and warmup_samples >= 0")


@dataclass
class ServerConfig:
    """How `trainer serve` runs. Port 0 binds a free port (tests)."""

    host: str = "127.0.0.1"
    port: int = 8765
    runs_dir: str = "runs"
    cache: bool = False  # keep the first epoch's quantized taps on disk and train later epochs from them
    device: str = "cpu"  # torch device for decode + training: cpu | cuda | cuda:N
    resume: bool = False  # continue runs that have a checkpoint in runs_dir
    token: str | None = None  # when set, every HELLO must carry it
    queue_size: int = 8  # bounded batch queue per run = credits a device may have outstanding
    checkpoint_every: int = 200  # optimizer steps between checkpoints (and one at the end)
    bitplan_every: int = 100  # steps between BITPLAN messages; 0 disables them
    max_frame: int = 64 * 1024 * 1024  # bytes; larger WebSocket messages close the connection (1009)
    max_rows: int = 4096  # rows per BATCH
    max_tokens: int = 1 << 20  # tokens per BATCH (tokens mode)
    hello_timeout_s: float = 30.0
    threads: int | None = None  # torch intra-op threads (None: torch's default); 1 on small shared CPUs
    certfile: str | None = None  # PEM certificate (chain): serve wss:// (TLS) instead of ws://
    keyfile: str | None = None  # PEM private key of `certfile` (None: the key is inside certfile)
    side: SideConfig = field(default_factory=SideConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    federated: bool = False  # one shared side network per task for every device and backbone (federated.py)
    fed: FedConfig = field(default_factory=FedConfig)

    def validate(self) -> None:
        if self.federated and self.cache:
            raise ValueError("--federated and --cache do not combine: federated devices stream every epoch")
        if self.federated:
            self.fed.validate()
        if self.queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {self.queue_size}")
        if self.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {self.checkpoint_every}")
        if self.bitplan_every < 0:
            raise ValueError(f"bitplan_every must be >= 0, got {self.bitplan_every}")
        if self.max_frame < 1024:
            raise ValueError(f"max_frame must be >= 1024 bytes, got {self.max_frame}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.keyfile is not None and self.certfile is None:
            raise ValueError("keyfile needs certfile: give both --certfile and --keyfile to serve wss://")
        for name in ("certfile", "keyfile"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{name} {path} does not exist")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"device must be cpu, cuda or cuda:N, got {self.device!r}")
        self.side.validate()
        self.optim.validate()


def atomic_write(path: Path, data: bytes) -> None:
    """Write via a temp file + os.replace, so readers never see a half-written file."""
    import os

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
