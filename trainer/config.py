"""Typed configuration: validated once, saved as JSON next to every run.

`ServerConfig` is what `trainer serve` is started with. `RunConfig` is one side network's
complete recipe (the device's HELLO + the server's hyperparameters); it is written to
`runs/<run>/config.json` and is enough to rebuild the model for `trainer export`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from mobillm.common import schema
from mobillm.common.errors import BadInput
from mobillm.common.options import option
from mobillm.common.taps import TapSpec

ACTIVATIONS = ("relu", "gelu")
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
POOLINGS = ("last", "mean")
INPUT_NORMS = ("none", "channel")
PRECISIONS = ("fp32", "fp16", "bf16")


def size(text: str) -> int:
    """'1G', '512M', '1.5GiB', '65536' -> bytes (binary units); ValueError otherwise (argparse: exit 2)."""
    m = _SIZE.fullmatch(str(text).strip())
    if not m:
        raise ValueError(f"not a size: {text!r} (e.g. 1G, 512M, 65536)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


class ConfigError(BadInput, ValueError):
    """A configuration value out of range; the message names the option and what it accepts."""


class RunFolderError(BadInput, FileNotFoundError):
    """A run folder lacks a file the command needs (config, checkpoint, metrics); the message says which."""


def checked(config) -> None:
    """ConfigError naming the first value of `config` (or of the configs it holds) that breaks the
    rules declared on its field (schema.check), or a `cross_check` rule across its fields."""
    try:
        schema.check(config)
    except schema.SchemaError as exc:
        raise ConfigError(str(exc)) from None


def _positive(value: float) -> str | None:
    return None if value > 0 else f"must be > 0, got {value}"


def _interval(text: str, test):
    """A field check: `test(value)` must hold; otherwise the value must be in `text`, e.g. "(0, 1]"."""
    return lambda value: None if test(value) else f"must be in {text}, got {value}"


def _all_positive(values: list) -> str | None:
    return None if all(v > 0 for v in values) else f"must all be > 0, got {values}"


def _all_at_least_1(values: list) -> str | None:
    return None if all(v >= 1 for v in values) else f"must all be >= 1, got {values}"


def _torch_device(device: str) -> str | None:
    return None if device == "cpu" or device.startswith("cuda") else f"must be cpu, cuda or cuda:N, got {device!r}"


def _ws_url(url: str) -> str | None:
    return None if url.startswith(("ws://", "wss://")) else f"must be a ws:// or wss:// URL template (--rank-url), got {url!r}"


@dataclass
class SideConfig:
    """The side network's architecture (MobiLLM Eq. 5). `tap_widths`/`out_dim` come from the HELLO."""

    tap_widths: list[int] = option(help="width of each tap, from the HELLO", default_factory=list, cli=False)
    out_dim: int = option(0, "head outputs, from the HELLO", cli=False)
    # Taps of another width than the side network's get a Linear projection.
    side_width: int | None = option(None, min=1, help="side network width (default: the first tap's); with --federated, the "
                                          "shared width")
    bottleneck: int = option(64, "adapter bottleneck r", min=1)
    activation: str = option("relu", "adapter activation", choices=ACTIVATIONS)
    pooling: str = option("last", "head input: last real token, or masked mean (needs mode tokens)", choices=POOLINGS)
    init_std: float = option(0.02, "W_down ~ N(0, init_std)", cli=False, min=0)
    up_init_std: float = option(1e-4, "W_up ~ N(0, up_init_std): each adapter starts close to the identity residual",
                                cli=False, min=0)
    ln_eps: float = option(1e-5, "LayerNorm epsilon", cli=False)
    adapter_per_tap: bool = option(False, "give tap 1 its own adapter too (Eq. 5 from s_0 = 0): M taps -> M adapters "
                                          "(default: s_1 = b_1, M-1 adapters)")
    input_norm: str = option("none", "channel: the side network standardizes every tap channel by its mean and spread "
                                     "over the first --stats-rows training rows, then frozen (kept in the checkpoint "
                                     "and in the exported ONNX); none: taps as they arrive", choices=INPUT_NORMS)
    stats_rows: int = option(1024, "--input-norm channel: training rows the statistics are measured on", min=1)

    def to_meta(self) -> dict:
        """This config as the MODEL meta carries it; `adapter_per_tap` only when set, so frames of
        runs without it stay byte-identical to those sent before the option existed."""
        meta = dataclasses.asdict(self)
        if not self.adapter_per_tap:
            del meta["adapter_per_tap"]
        if self.input_norm == "none":  # likewise for runs without server-side standardization
            del meta["input_norm"], meta["stats_rows"]
        return meta

    def for_taps(self, tap_widths: list[int], out_dim: int) -> "SideConfig":
        """This template completed for one run's taps; the side width is resolved here."""
        return dataclasses.replace(self, tap_widths=list(tap_widths), out_dim=out_dim,
                                   side_width=self.side_width or tap_widths[0])


@dataclass
class OptimConfig:
    """AdamW with linear warm-up and linear decay to zero over the declared samples."""

    lr: float = option(1e-3, "peak AdamW learning rate", check=_positive)
    weight_decay: float = option(0.01, "AdamW weight decay")
    betas: tuple[float, float] = option((0.9, 0.999), "AdamW betas", cli=False)
    eps: float = option(1e-8, "AdamW epsilon", cli=False)
    warmup_ratio: float = option(0.06, "warm-up share of all samples (epochs * samples per epoch)",
                                 check=_interval("[0, 1)", lambda r: 0 <= r < 1))
    grad_clip: float = option(1.0, "max global gradient norm (0: off)", min=0)
    seed: int = option(0, "initialisation and cached-epoch order seed")
    cache_batch_size: int | None = option(None, "rows per step in cached epochs (default: the device's batch size)",
                                          min=1)
    precision: str = option("fp32", "training precision: fp32; fp16 (autocast + loss scaling, CUDA only: on a CPU "
                                    "server it falls back to fp32 with one line); bf16 (autocast)", choices=PRECISIONS)
    # --cache runs: the cached epochs (and peak lr) chosen on held-out cached samples (trainer/select.py)
    select_epochs: list[int] = option(help="with --cache: candidate epoch counts, e.g. 1,2,3,4,6,8; once the first "
                                           "epoch is cached, each is trained on the cached samples but "
                                           "--select-share and scored on those; the run then trains the best on "
                                           "every cached sample (default: off, the device's --epochs)",
                                      default_factory=list, check=_all_at_least_1)
    select_lrs: list[float] = option(help="candidate peak learning rates for --select-epochs, e.g. 5e-4,1e-3 "
                                          "(default: --lr alone)", default_factory=list, check=_all_positive)
    select_share: float = option(0.1, "share of the cached samples --select-epochs holds out to score candidates",
                                 check=_interval("(0, 1)", lambda r: 0 < r < 1))
    ensemble: int = option(1, "with --select-epochs: side networks trained with the chosen schedule on every "
                              "cached sample, each from its own seed; the returned ONNX averages their logits",
                           min=1, max=16)
    replay: int = option(0, "with --cache: while the device's next batch has not arrived, train up to this many "
                            "batches drawn from the samples cached so far (at the streamed schedule's current lr, "
                            "which they do not advance), so the network learns faster than the device streams; "
                            "a streamed batch always goes first (default 0: off)", min=0, max=64)

    def cross_check(self) -> None:
        """The rules across fields (schema.check runs it after the fields' own)."""
        if self.select_lrs and not self.select_epochs:
            raise ConfigError("select_lrs needs select_epochs (the candidates are epochs x learning rates)")
        if self.ensemble > 1 and not self.select_epochs:
            raise ConfigError("ensemble needs select_epochs (its members train with the chosen schedule)")


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
    taps: list[TapSpec]  # as in the HELLO
    cache: bool
    side: SideConfig
    optim: OptimConfig
    bits: str = "engine"  # the HELLO's bits: engine | auto | <fmt> | <fmt>,<fmt>,... (protocol.allowed_formats)

    @property
    def total_samples(self) -> int:
        return self.epochs * self.samples_per_epoch

    def to_dict(self) -> dict:
        return schema.dump(self)

    @classmethod
    def from_dict(cls, data: dict) -> "RunConfig":
        try:
            return schema.load(cls, data)
        except schema.SchemaError as exc:
            raise ConfigError(f"run config: {exc}") from None

    def save(self, folder: Path) -> Path:
        path = Path(folder) / "config.json"
        atomic_write(path, (json.dumps(self.to_dict(), indent=2) + "\n").encode())
        return path

    @classmethod
    def load(cls, folder: Path | str) -> "RunConfig":
        path = Path(folder) / "config.json"
        if not path.is_file():
            raise RunFolderError(f"{path} not found; is {folder} a run folder written by `trainer serve`?")
        return cls.from_dict(json.loads(path.read_text()))


@dataclass
class FedConfig:
    """Federated side-tuning (`trainer serve --federated`): one shared side network per task.

    Every backbone family's taps are aligned to `slots` slots by relative depth and projected to
    `width`; `max_share` caps any one device's share of the last `share_window` trained samples."""

    slots: int = option(4, "slots of the shared network; taps map to them by relative depth "
                           "(slot k sits at relative depth k / slots)", flag="fed-slots", min=1, max=256)
    # Set by --side-width when --federated: the same width D for every backbone.
    width: int = option(256, "shared side width", cli=False, min=1)
    max_share: float = option(1.0, "most of a sliding window of trained samples one device may "
                                   "contribute (1: no cap)", check=_interval("(0, 1]", lambda r: 0 < r <= 1))
    share_window: int = option(512, "samples in the window --max-share is measured over", min=1)
    warmup_samples: int = option(256, "lr warm-up in samples, then lr * sqrt(warmup / samples)",
                                 flag="fed-warmup", min=0)


@dataclass
class WorldConfig:
    """A trainer of several ranks (torchrun; docs/scale_out.md). Rank and world size come from
    torchrun's RANK / WORLD_SIZE / LOCAL_RANK; rank R listens on --port + R."""

    rank_url: str | None = option(None, "URL a device is redirected to for the rank that owns it; {rank} and "
                                        "{port} are filled in (default: ws[s]://HOST:{port}/)", check=_ws_url)
    tick_s: float = option(0.05, "federated runs: seconds an idle rank waits for a batch before joining the "
                                 "world's next step with none", check=_interval("(0, 10]", lambda t: 0 < t <= 10))
    timeout_s: float = option(120.0, "seconds a collective may wait for the other ranks before this rank "
                                     "gives the world up", flag="world-timeout", check=_positive)


@dataclass
class ServerConfig:
    """How `trainer serve` runs. Port 0 binds a free port (tests)."""

    host: str = option("127.0.0.1", "interface to bind (keep 127.0.0.1 unless behind a proxy)")
    port: int = option(8765, "port to bind (0: any free port)")
    runs_dir: str = option("runs", "folder holding one sub-folder per run", flag="runs")
    cache: bool = option(False, "cache the first epoch's quantized taps on disk and train later epochs from it "
                                "(the device streams one epoch)")
    device: str = option("cpu", "torch device for decoding and training: cpu, cuda, cuda:N", check=_torch_device)
    resume: bool = option(False, "continue runs that have a checkpoint in --runs")
    token: str | None = option(None, "when set, every HELLO must carry it (trainer serve reads it from --token-file)",
                               cli=False)
    queue_size: int = option(8, "batches queued per run (= device credits)", flag="queue", min=1)
    checkpoint_every: int = option(200, "optimizer steps between checkpoints (and one at the end)", min=1)
    bitplan_every: int = option(100, "steps between BITPLAN messages (0: off)", min=0)
    # Larger WebSocket messages close the connection (1009).
    max_frame: int = option(64 * 1024 * 1024, "largest accepted message, bytes (after the HELLO)", metavar="SIZE",
                            parse=size, min=1024)
    max_rows: int = option(4096, "largest accepted batch, rows")
    max_tokens: int = option(1 << 20, "largest accepted batch, tokens (tokens mode)")
    hello_timeout_s: float = option(30.0, "seconds a new connection has to send its HELLO", cli=False)
    # Hostile clients (docs/reliability.md "Hostile clients"): trainer/budget.py and trainer/gate.py.
    memory_budget: int | None = option(None, "bytes the server may use in all, e.g. 8G or 512M: sessions and runs "
                                             "that would not fit are refused with ERROR over_budget (default: "
                                             "half of physical RAM)", metavar="SIZE", parse=size)
    session_memory: int = option(256 << 20, "bytes reserved per connected device: messages not yet read plus "
                                            "its batches received, queued and decoded; one batch may use "
                                            "(this - 2 x --max-frame) / (--queue + 1)", metavar="SIZE", parse=size)
    hello_max_bytes: int = option(64 << 10, "largest message before the HELLO is authenticated, bytes (at most "
                                            "--max-frame)", min=1024)
    max_unauthenticated: int = option(64, "connections that have not yet sent an authenticated HELLO, in all", min=1)
    max_unauthenticated_per_address: int = option(8, "... of them from one address", flag="max-unauth-per-address",
                                                  min=1)
    auth_backoff_s: float = option(1.0, "after 3 wrong tokens an address is banned this long, doubling per "
                                        "further failure", cli=False)
    auth_ban_s: float = option(300.0, "longest ban after wrong tokens", cli=False)
    idle_timeout_s: float = option(300.0, "seconds a run may sit with no device before it is checkpointed and "
                                          "released (restored on its next HELLO), and a connected device that "
                                          "holds credits may send nothing", flag="idle-timeout", check=_positive)
    max_runs_per_client: int = option(8, "runs one device id may hold open at once", min=1)
    max_run_folders: int = option(10000, "run folders under --runs at most: a HELLO that would start another "
                                         "new run gets ERROR too_many_runs (archive finished runs, or raise it)", min=1)
    threads: int | None = option(None, "torch CPU threads (default: torch's choice; 1 on small shared CPUs)", min=1)
    certfile: str | None = option(None, "PEM certificate (chain): serve wss:// (TLS 1.2+); devices verify it with "
                                        "--ca (default: plain ws://)")
    keyfile: str | None = option(None, "PEM private key for --certfile (default: inside --certfile)")
    metrics_port: int | None = option(None, "also serve Prometheus /metrics alone on this port, without the "
                                             "token (default: only on --port, where the token applies)", min=0, max=65535)
    tensorboard: bool = option(True, "write TensorBoard event files to each run folder (needs tensorboard)")
    side: SideConfig = field(default_factory=SideConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    federated: bool = option(False, "one shared side network per task for every device and backbone "
                                    f"(docs/federated.md); --side-width is then the shared width, {FedConfig.width} "
                                    "unless given")
    fed: FedConfig = field(default_factory=FedConfig)
    world: WorldConfig = field(default_factory=WorldConfig)

    def batch_limit(self) -> int:
        """Most bytes one batch may cost (budget.batch_cost): a session's share after the WebSocket buffers."""
        return (self.session_memory - 2 * self.max_frame) // (self.queue_size + 1)

    def validate(self) -> None:
        """ConfigError for the first value out of its rules (declared on the fields, here and in the
        side, optim, fed and world configs), then for the rules across fields (`cross_check`)."""
        checked(self)

    def cross_check(self) -> None:
        """The rules across fields (schema.check runs it after the fields' own)."""
        if self.federated and self.cache:
            raise ConfigError("--federated and --cache do not combine: federated devices stream every epoch")
        if self.optim.select_epochs and not self.cache:
            raise ConfigError("--select-epochs needs --cache: the candidates train on the cached first epoch")
        if self.optim.replay and not self.cache:
            raise ConfigError("--replay needs --cache: it draws its batches from the samples cached so far")
        if self.federated and self.side.input_norm != "none":
            raise ConfigError("--input-norm channel is for single-device runs: the federated network aligns each "
                              "backbone's taps with its own projection (docs/federated.md)")
        if self.metrics_port is not None and importlib.util.find_spec("prometheus_client") is None:
            raise ConfigError("--metrics-port needs prometheus_client: pip install 'mobillm[observability]'")
        if self.batch_limit() < 1 << 20:
            raise ConfigError(f"session_memory must be at least 2 x max_frame + (queue + 1) x 1 MiB = "
                              f"{(2 * self.max_frame + (self.queue_size + 1) * (1 << 20)) >> 20} MiB, got "
                              f"{self.session_memory >> 20} MiB")
        if self.memory_budget is not None and self.memory_budget < self.session_memory:
            raise ConfigError(f"memory_budget ({self.memory_budget >> 20} MiB) must hold at least one session "
                              f"(session_memory {self.session_memory >> 20} MiB)")
        if self.keyfile is not None and self.certfile is None:
            raise ConfigError("keyfile needs certfile: give both --certfile and --keyfile to serve wss://")
        for name in ("certfile", "keyfile"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"{name} {path} does not exist")
        if self.certfile is not None:
            tls_context(self.certfile, self.keyfile)  # a bad PEM is refused here, not once the server starts


def tls_context(certfile: str, keyfile: str | None):
    """The server's TLS context (TLS 1.2 or newer) for wss://; ConfigError when the files are not a
    PEM certificate chain and its private key."""
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(certfile, keyfile)
    except (ssl.SSLError, OSError) as exc:  # not PEM, a key that does not match, unreadable
        raise ConfigError(f"--certfile {certfile} --keyfile {keyfile or '(none: the key inside --certfile)'}: "
                          f"not a PEM certificate chain and its private key ({exc})") from None
    return ctx


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
