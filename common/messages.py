"""The typed control messages of the protocol: every key of every meta is spelled here, once.

`wire.py` frames bytes; this module says what the JSON meta of each message holds. Both sides
build and read messages only through these dataclasses: the device builds `Hello` and reads
`Welcome`, `Credit`, `BitPlan`, `ModelMeta` and `TrainingDone`; the server does the reverse.
`from_meta` validates (unknown extra keys are ignored, for forward compatibility) and raises
`ProtocolError` with a stable code; `to_meta` gives the dict `wire.encode_frame` serialises, in a
fixed key order (tests/common/test_golden_frames.py pins the bytes). `docs/protocol.md` is the prose.

The side network's ONNX I/O contract (`side_input_names`, `SIDE_MASK`, `SIDE_OUTPUT`) lives here
too: the server exports the graph with these names and the device feeds it by them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mobillm.common import wire
from mobillm.common.errors import BadInput
from mobillm.kernels import codec

# Run, device and task names name folders on the server: ASCII letters and digits, then also . _ -.
# Always checked with `is_name` (re.fullmatch): `$` would accept a trailing newline.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
NAME_RULE = "1..128 characters of A-Z a-z 0-9 . _ -, starting with a letter or digit"
SHA256 = re.compile(r"[0-9a-f]{64}")
MAX_MODEL_ID = 512  # a Hugging Face id or the export machine's checkpoint folder
MAX_TAPS = 256
MAX_EPOCHS = 10_000
MAX_SAMPLES = 1 << 40

# The side network's ONNX graph: inputs tap0..tap{M-1} float32 [batch, tokens, hidden_i] and
# mask float32 [batch, tokens] (1 = real token); output logits float32 [batch, out_dim].
SIDE_MASK = "mask"
SIDE_OUTPUT = "logits"


def is_name(value) -> bool:
    """True when `value` is a valid run, device or task name (the whole string, see NAME)."""
    return isinstance(value, str) and NAME.fullmatch(value) is not None


def is_model_id(value) -> bool:
    """True for a model id a HELLO may carry: 1..MAX_MODEL_ID printable characters (no newline or
    control character), not starting or ending with a space. It names no folder on the server."""
    return (isinstance(value, str) and 0 < len(value) <= MAX_MODEL_ID and value.isprintable()
            and value == value.strip())


def side_tap_name(index: int) -> str:
    """The ONNX input name of tap `index` of the side network."""
    return f"tap{index}"


def side_input_names(n_taps: int) -> list[str]:
    """Every ONNX input of a side network with `n_taps` taps, in graph order."""
    return [side_tap_name(i) for i in range(n_taps)] + [SIDE_MASK]


class ProtocolError(BadInput):
    """A message that breaks the protocol (or a reason to end a session): `code` travels in the
    ERROR frame, `message` says what to do."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code, self.message = code, message


def _get(meta: dict, name: str, kind: type | tuple, code: str, what: str, default=...):
    """meta[name] checked against `kind` (bool is never an int here: it is never a valid count)."""
    if name not in meta and default is not ...:
        return default
    value = meta.get(name)
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise ProtocolError(code, f"{what} field {name!r} must be a {names}, got {value!r}")
    return value


def _count(meta: dict, name: str, code: str, what: str, default=...) -> int:
    value = _get(meta, name, int, code, what, default)
    if value < 0:
        raise ProtocolError(code, f"{what} field {name!r} must be >= 0, got {value}")
    return value


@dataclass(frozen=True)
class TapInfo:
    """One tap as the HELLO declares it: backbone layer, width and engine quant format."""

    layer: int
    hidden: int
    fmt: str
    block_size: int

    def to_meta(self) -> dict:
        return {"layer": self.layer, "hidden": self.hidden, "fmt": self.fmt, "block_size": self.block_size}

    @classmethod
    def from_meta(cls, meta, index: int = 0) -> "TapInfo":
        if not isinstance(meta, dict):
            raise ProtocolError("bad_hello", f"taps[{index}] must be an object")
        values: dict = {k: meta.get(k) for k in ("layer", "hidden", "fmt", "block_size")}
        ints = ("layer", "hidden", "block_size")
        if not all(isinstance(values[k], int) and not isinstance(values[k], bool) for k in ints):
            raise ProtocolError("bad_hello", f"taps[{index}] needs integer layer, hidden and block_size")
        if values["fmt"] not in codec.FORMATS:
            raise ProtocolError("bad_hello", f"taps[{index}].fmt must be one of {codec.FORMATS}, "
                                             f"got {values['fmt']!r}")
        if not 0 < values["hidden"] <= 65536 or not 0 <= values["block_size"] <= 65535 or values["layer"] < 0:
            raise ProtocolError("bad_hello", f"taps[{index}]: hidden must be 1..65536, block_size 0..65535 (0: "
                                             f"one scale per tensor), "
                                             f"layer >= 0")
        return cls(**values)


def allowed_formats(engine_fmts: list[str], bits: str) -> list[str] | None:
    """Per-tap BATCH formats for a HELLO `bits` value (see `Hello.formats`); None: any format."""
    if bits == "engine":
        return list(engine_fmts)
    if bits == "auto" or bits.startswith("auto:"):  # the device adapts (edge_runtime/bitplan.py RULES)
        return None
    fmts = [codec.check_format(f.strip()) for f in bits.split(",")]
    return fmts * len(engine_fmts) if len(fmts) == 1 else fmts


@dataclass(frozen=True)
class Hello:
    """HELLO (device -> server): who the device is, what it sends, and for how long."""

    manifest_sha256: str
    model_id: str
    task: str
    task_type: str
    num_labels: int
    mode: str
    taps: tuple[TapInfo, ...]
    device_id: str
    run: str | None  # the run name asked for; None: the server names it (see `run_name`)
    epochs: int
    samples_per_epoch: int
    token: str | None = None
    bits: str = "engine"
    num_layers: int | None = None  # backbone depth (optional; federated runs align taps by layer / num_layers)

    @property
    def out_dim(self) -> int:
        return 1 if self.task_type == "regression" else self.num_labels

    @property
    def run_name(self) -> str:
        """The single-device run this HELLO feeds: its `run`, else one per (task, engine)."""
        return self.run or f"{self.task}-{self.manifest_sha256[:12]}"

    def formats(self) -> list[str] | None:
        """The format each tap's BATCH payloads must use, or None when they may change batch to batch.

        `bits`: "engine" (default) the HELLO's `fmt` per tap; "auto" or "auto:<rule>" any format (the
        device adapts to its uplink, guided by BITPLAN); "<fmt>" every tap in that format; "<f0>,<f1>,..." one per tap."""
        return allowed_formats([t.fmt for t in self.taps], self.bits)

    def identity(self) -> dict:
        """The fields a reconnecting device must repeat exactly to continue a run."""
        return {"task": self.task, "task_type": self.task_type, "num_labels": self.num_labels,
                "model_id": self.model_id, "manifest_sha256": self.manifest_sha256, "mode": self.mode,
                "taps": [t.to_meta() for t in self.taps], "epochs": self.epochs,
                "samples_per_epoch": self.samples_per_epoch, "device_id": self.device_id, "bits": self.bits}

    def to_meta(self) -> dict:
        return {"protocol": wire.VERSION, "manifest_sha256": self.manifest_sha256, "model_id": self.model_id,
                "task": self.task, "task_type": self.task_type, "num_labels": self.num_labels, "mode": self.mode,
                "bits": self.bits, "taps": [t.to_meta() for t in self.taps], "num_layers": self.num_layers,
                "device_id": self.device_id, "run": self.run, "epochs": self.epochs,
                "samples_per_epoch": self.samples_per_epoch, "token": self.token}

    @classmethod
    def from_meta(cls, meta: dict) -> "Hello":
        """Validate a HELLO meta; unknown extra fields are ignored (forward compatibility)."""
        if meta.get("protocol") != wire.VERSION:
            raise ProtocolError("version", f"HELLO protocol {meta.get('protocol')!r} is not supported; "
                                           f"this server speaks protocol {wire.VERSION}")

        def field(name: str, kind: type):
            return _get(meta, name, kind, "bad_hello", "HELLO")

        sha = field("manifest_sha256", str)
        if not SHA256.fullmatch(sha):
            raise ProtocolError("bad_hello", "manifest_sha256 must be 64 lowercase hex digits")
        task = field("task", str)
        if not is_name(task):
            raise ProtocolError("bad_hello", f"task {task!r}: a task name is {NAME_RULE}")
        task_type = field("task_type", str)
        if task_type not in wire.LABEL_KINDS:
            raise ProtocolError("bad_hello", f"task_type must be one of {list(wire.LABEL_KINDS)}, got {task_type!r}")
        num_labels = field("num_labels", int)
        if task_type == "class" and not 2 <= num_labels <= 1 << 20:
            raise ProtocolError("bad_hello", f"a classification task needs 2..{1 << 20} labels, got {num_labels}")
        if task_type == "regression" and num_labels != 1:
            raise ProtocolError("bad_hello", f"a regression task has num_labels 1, got {num_labels}")
        mode = field("mode", str)
        if mode not in wire.MODES:
            raise ProtocolError("bad_hello", f"mode must be one of {list(wire.MODES)}, got {mode!r}")
        raw_taps = field("taps", list)
        if not 1 <= len(raw_taps) <= MAX_TAPS:
            raise ProtocolError("bad_hello", f"taps must list 1..{MAX_TAPS} taps, got {len(raw_taps)}")
        taps = tuple(TapInfo.from_meta(t, i) for i, t in enumerate(raw_taps))
        device_id = field("device_id", str)
        if not is_name(device_id):
            raise ProtocolError("bad_hello", f"device_id {device_id!r}: a device id is {NAME_RULE}")
        run = meta.get("run") or None
        if run is not None and not is_name(run):
            raise ProtocolError("bad_hello", f"run {run!r}: a run name is {NAME_RULE} (it names a folder)")
        model_id = field("model_id", str)
        if not is_model_id(model_id):
            raise ProtocolError("bad_hello", f"model_id {model_id[:80]!r} must be 1..{MAX_MODEL_ID} printable "
                                             f"characters without leading or trailing spaces")
        epochs = field("epochs", int)
        samples = field("samples_per_epoch", int)
        if not 1 <= epochs <= MAX_EPOCHS or not 1 <= samples <= MAX_SAMPLES:
            raise ProtocolError("bad_hello", f"epochs must be 1..{MAX_EPOCHS} and samples_per_epoch "
                                             f"1..{MAX_SAMPLES}")
        token = meta.get("token")
        if token is not None and not isinstance(token, str):
            raise ProtocolError("bad_hello", "token must be a string")
        bits = meta.get("bits") or "engine"
        if not isinstance(bits, str):
            raise ProtocolError("bad_hello", "bits must be a string: engine, auto, a format, or one format per tap")
        num_layers = meta.get("num_layers")
        if num_layers is not None:
            deepest = max(t.layer for t in taps)
            if not isinstance(num_layers, int) or isinstance(num_layers, bool) or not deepest <= num_layers <= 65536:
                raise ProtocolError("bad_hello", f"num_layers must be an integer {deepest}..65536 (at least the "
                                                 f"deepest tap layer), got {num_layers!r}")
        hello = cls(sha, model_id, task, task_type, num_labels, mode, taps, device_id, run,
                    epochs, samples, token, bits, num_layers)
        try:
            fmts = hello.formats()
        except ValueError as exc:
            raise ProtocolError("bad_hello", f"bits {bits!r}: {exc}") from None
        if fmts is not None and len(fmts) != len(taps):
            raise ProtocolError("bad_hello", f"bits lists {len(fmts)} formats for {len(taps)} taps")
        return hello


@dataclass(frozen=True)
class FedWelcome:
    """WELCOME's federated extension: the backbone family the device joined and its shared slots."""

    family: str
    slots: list[int]
    n_slots: int
    devices: int

    def to_meta(self) -> dict:
        return {"family": self.family, "slots": list(self.slots), "n_slots": self.n_slots, "devices": self.devices}

    @classmethod
    def from_meta(cls, meta) -> "FedWelcome":
        if not isinstance(meta, dict):
            raise ProtocolError("bad_welcome", "WELCOME field 'federated' must be an object")
        return cls(_get(meta, "family", str, "bad_welcome", "WELCOME federated"),
                   _get(meta, "slots", list, "bad_welcome", "WELCOME federated"),
                   _count(meta, "n_slots", "bad_welcome", "WELCOME federated"),
                   _count(meta, "devices", "bad_welcome", "WELCOME federated"))


@dataclass(frozen=True)
class Welcome:
    """WELCOME (server -> device): the session is accepted; credits, resume point, streaming state."""

    session: str
    run: str
    credits: int
    samples_done: int  # the resume point: samples of the device's order already trained
    cache: bool
    stop_streaming: bool
    total_samples: int
    federated: FedWelcome | None = None
    # A trainer of several ranks (docs/scale_out.md): the URL of the rank that owns this device;
    # the device closes and connects there. Sent only when set, so other WELCOMEs keep their bytes.
    redirect: str | None = None

    def to_meta(self) -> dict:
        meta = {"session": self.session, "run": self.run, "credits": self.credits,
                "resume": {"samples_done": self.samples_done}, "cache": self.cache,
                "stop_streaming": self.stop_streaming, "total_samples": self.total_samples}
        if self.federated is not None:
            meta["federated"] = self.federated.to_meta()
        if self.redirect is not None:
            meta["redirect"] = self.redirect
        return meta

    @classmethod
    def from_meta(cls, meta: dict) -> "Welcome":
        resume = _get(meta, "resume", dict, "bad_welcome", "WELCOME")
        fed = meta.get("federated")
        return cls(_get(meta, "session", str, "bad_welcome", "WELCOME"),
                   _get(meta, "run", str, "bad_welcome", "WELCOME"),
                   _count(meta, "credits", "bad_welcome", "WELCOME"),
                   _count(resume, "samples_done", "bad_welcome", "WELCOME resume"),
                   _get(meta, "cache", bool, "bad_welcome", "WELCOME", False),
                   _get(meta, "stop_streaming", bool, "bad_welcome", "WELCOME", False),
                   _count(meta, "total_samples", "bad_welcome", "WELCOME", 0),
                   None if fed is None else FedWelcome.from_meta(fed),
                   _get(meta, "redirect", str, "bad_welcome", "WELCOME", None))


@dataclass(frozen=True)
class Credit:
    """CREDIT (server -> device): `credits` more batches may be sent; batches up to `acked_seq` and
    the first `samples_done` samples are trained; `stop_streaming`: send no more batches, only DONE."""

    credits: int
    acked_seq: int
    samples_done: int
    stop_streaming: bool = False

    def to_meta(self) -> dict:
        meta = {"credits": self.credits, "acked_seq": self.acked_seq, "samples_done": self.samples_done}
        if self.stop_streaming:
            meta["stop_streaming"] = True
        return meta

    @classmethod
    def from_meta(cls, meta: dict) -> "Credit":
        return cls(_count(meta, "credits", "bad_credit", "CREDIT"),
                   _get(meta, "acked_seq", int, "bad_credit", "CREDIT"),
                   _count(meta, "samples_done", "bad_credit", "CREDIT"),
                   _get(meta, "stop_streaming", bool, "bad_credit", "CREDIT", False))


@dataclass(frozen=True)
class BitPlan:
    """BITPLAN (server -> device): per-tap importance (RMS gradient w.r.t. the dequantized tap) at `step`."""

    importance: list[float]
    step: int

    def to_meta(self) -> dict:
        return {"importance": list(self.importance), "step": self.step}

    @classmethod
    def from_meta(cls, meta: dict) -> "BitPlan":
        importance = _get(meta, "importance", list, "bad_bitplan", "BITPLAN")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in importance):
            raise ProtocolError("bad_bitplan", "BITPLAN importance must be a list of numbers")
        return cls([float(v) for v in importance], _count(meta, "step", "bad_bitplan", "BITPLAN"))


@dataclass(frozen=True)
class FedModel:
    """MODEL meta's federated extension: which family's alignment the graph holds, at which step."""

    family: str
    slots: list[int]
    n_slots: int
    num_layers: int
    step: int

    def to_meta(self) -> dict:
        return {"family": self.family, "slots": list(self.slots), "n_slots": self.n_slots,
                "num_layers": self.num_layers, "step": self.step}


@dataclass(frozen=True)
class ModelMeta:
    """MODEL meta (server -> device, the body is the side network's ONNX file): how to feed the
    graph (`inputs`, `output`: the side-network contract above) and what it was trained for."""

    config: dict  # the side network's SideConfig as a dict (pooling, widths, ...)
    n_taps: int
    task: str
    task_type: str
    num_labels: int
    run: str
    taps: list[dict]
    metrics: dict
    federated: FedModel | None = None

    def to_meta(self) -> dict:
        meta = {"config": self.config, "inputs": side_input_names(self.n_taps), "output": SIDE_OUTPUT,
                "task": self.task, "task_type": self.task_type, "num_labels": self.num_labels, "run": self.run,
                "taps": self.taps}
        if self.federated is not None:
            meta["federated"] = self.federated.to_meta()
        meta["metrics"] = self.metrics
        return meta

    @classmethod
    def check(cls, meta: dict) -> dict:
        """Validate a received MODEL meta (the device keeps the dict as it came, unknown keys too)."""
        config = _get(meta, "config", dict, "bad_model", "MODEL")
        inputs = _get(meta, "inputs", list, "bad_model", "MODEL")
        if inputs != side_input_names(len(inputs) - 1) or meta.get("output") != SIDE_OUTPUT:
            raise ProtocolError("bad_model", f"MODEL inputs {inputs!r} / output {meta.get('output')!r} are not "
                                             f"the side-network contract tap0..tapN, {SIDE_MASK} -> {SIDE_OUTPUT}")
        if not isinstance(config.get("pooling", "last"), str):
            raise ProtocolError("bad_model", "MODEL config.pooling must be a string")
        _get(meta, "metrics", dict, "bad_model", "MODEL", {})
        return meta


@dataclass(frozen=True)
class StreamDone:
    """DONE (device -> server): the device has no more batches to send."""

    samples: int

    def to_meta(self) -> dict:
        return {"samples": self.samples}


@dataclass(frozen=True)
class TrainingDone:
    """DONE (server -> device), after MODEL: training finished."""

    samples_trained: int
    steps: int

    def to_meta(self) -> dict:
        return {"samples_trained": self.samples_trained, "steps": self.steps}

    @classmethod
    def from_meta(cls, meta: dict) -> "TrainingDone":
        return cls(_count(meta, "samples_trained", "bad_done", "DONE"), _count(meta, "steps", "bad_done", "DONE"))


# ERROR codes of the server's limits (docs/protocol.md lists every code). A device must not retry
# them as they are: each says what to change first.
OVER_BUDGET = "over_budget"  # the server's --memory-budget has no room for this session, run or batch
TOO_MANY_RUNS = "too_many_runs"  # the device id holds --max-runs-per-client open runs, or --runs --max-run-folders
RUN_EXISTS = "run_exists"  # the run has a checkpoint and the server was restarted without --resume
LIMIT_CODES = frozenset({OVER_BUDGET, TOO_MANY_RUNS, RUN_EXISTS})


@dataclass(frozen=True)
class ErrorReport:
    """ERROR (either way): what was wrong; the sender closes the session after it."""

    code: str
    message: str

    def to_meta(self) -> dict:
        return {"code": self.code, "message": self.message}

    @classmethod
    def from_meta(cls, meta: dict) -> "ErrorReport":
        code, message = meta.get("code"), meta.get("message")
        return cls(code if isinstance(code, str) else "unknown",
                   message if isinstance(message, str) else str(meta))


_TYPES = {Hello: wire.MsgType.HELLO, Welcome: wire.MsgType.WELCOME, Credit: wire.MsgType.CREDIT,
          BitPlan: wire.MsgType.BITPLAN, StreamDone: wire.MsgType.DONE, TrainingDone: wire.MsgType.DONE,
          ErrorReport: wire.MsgType.ERROR}


def frame(message, body: bytes = b"") -> bytes:
    """One encoded frame for a typed message (a `ModelMeta` goes with its ONNX file as `body`)."""
    msg_type = wire.MsgType.MODEL if isinstance(message, ModelMeta) else _TYPES[type(message)]
    return wire.encode_frame(msg_type, message.to_meta(), body)
