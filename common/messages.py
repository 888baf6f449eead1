"""The typed control messages of the protocol: every key of every meta is spelled here, once.

`wire.py` frames bytes; this module says what the JSON meta of each message holds. Both sides
build and read messages only through these dataclasses: the device builds `Hello` and reads
`Welcome`, `Credit`, `BitPlan`, `ModelMeta` and `TrainingDone`; the server does the reverse.
`from_meta` validates through `schema.load`, by the rules declared on each message's fields
(unknown extra keys are ignored, for forward compatibility), and raises `ProtocolError` with a
stable code; `to_meta` gives the dict `wire.encode_frame` serialises, in a
fixed key order (tests/common/test_golden_frames.py pins the bytes). `docs/protocol.md` is the prose.

The side network's ONNX I/O contract (`side_input_names`, `SIDE_MASK`, `SIDE_OUTPUT`) lives here
too: the server exports the graph with these names and the device feeds it by them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mobillm.common import schema, wire
from mobillm.common.errors import BadInput
from mobillm.common.schema import rule
from mobillm.common.taps import TapSpec
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


def _load(cls, meta, code: str, what: str):
    """A message `cls` from its meta by the rules on its fields; ProtocolError `code` otherwise."""
    try:
        return schema.load(cls, meta)
    except schema.SchemaError as exc:
        raise ProtocolError(code, f"{what} field {exc}") from None


def _name_rule(what: str):
    """A field check: `what` must be a name (NAME_RULE)."""
    return lambda value: None if is_name(value) else f"{value!r}: a {what} is {NAME_RULE}"


def _check_sha256(value: str) -> str | None:
    return None if SHA256.fullmatch(value) else "must be 64 lowercase hex digits"


def _check_model_id(value: str) -> str | None:
    return None if is_model_id(value) else (f"{value[:80]!r} must be 1..{MAX_MODEL_ID} printable characters "
                                            f"without leading or trailing spaces")


def _check_taps(taps: tuple) -> str | None:
    return None if 1 <= len(taps) <= MAX_TAPS else f"must list 1..{MAX_TAPS} taps, got {len(taps)}"


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

    manifest_sha256: str = rule(check=_check_sha256)
    model_id: str = rule(check=_check_model_id)
    task: str = rule(check=_name_rule("task name"))
    task_type: str = rule(choices=wire.LABEL_KINDS)
    num_labels: int = rule()
    mode: str = rule(choices=wire.MODES)
    taps: tuple[TapSpec, ...] = rule(check=_check_taps)
    device_id: str = rule(check=_name_rule("device id"))
    run: str | None = rule(check=_name_rule("run name (it names a folder)"))  # None: the server names it (`run_name`)
    epochs: int = rule(min=1, max=MAX_EPOCHS)
    samples_per_epoch: int = rule(min=1, max=MAX_SAMPLES)
    token: str | None = None
    bits: str = "engine"
    num_layers: int | None = rule(None, max=65536)  # backbone depth (optional; federated runs align taps by layer / num_layers)

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
        # An empty run or bits means "not given", as None does.
        return _load(cls, {**meta, "run": meta.get("run") or None, "bits": meta.get("bits") or "engine"},
                     "bad_hello", "HELLO")

    def cross_check(self) -> None:
        """The rules across fields (schema.check runs it after the fields' own)."""
        if self.task_type == "class" and not 2 <= self.num_labels <= 1 << 20:
            raise ProtocolError("bad_hello", f"a classification task needs 2..{1 << 20} labels, got {self.num_labels}")
        if self.task_type == "regression" and self.num_labels != 1:
            raise ProtocolError("bad_hello", f"a regression task has num_labels 1, got {self.num_labels}")
        deepest = max(t.layer for t in self.taps)
        if self.num_layers is not None and self.num_layers < deepest:
            raise ProtocolError("bad_hello", f"num_layers must be an integer {deepest}..65536 (at least the "
                                             f"deepest tap layer), got {self.num_layers!r}")
        try:
            fmts = self.formats()
        except ValueError as exc:
            raise ProtocolError("bad_hello", f"bits {self.bits!r}: {exc}") from None
        if fmts is not None and len(fmts) != len(self.taps):
            raise ProtocolError("bad_hello", f"bits lists {len(fmts)} formats for {len(self.taps)} taps")


@dataclass(frozen=True)
class FedWelcome:
    """WELCOME's federated extension: the backbone family the device joined and its shared slots."""

    family: str
    slots: list[int] = rule(min=0)
    n_slots: int = rule(min=0)
    devices: int = rule(min=0)

    def to_meta(self) -> dict:
        return {"family": self.family, "slots": list(self.slots), "n_slots": self.n_slots, "devices": self.devices}


@dataclass(frozen=True)
class Welcome:
    """WELCOME (server -> device): the session is accepted; credits, resume point, streaming state."""

    session: str
    run: str
    credits: int = rule(min=0)
    samples_done: int = rule(min=0, key="resume.samples_done")  # the resume point: samples of the device's order already trained
    cache: bool = False
    stop_streaming: bool = False
    total_samples: int = rule(0, min=0)
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
        return _load(cls, meta, "bad_welcome", "WELCOME")


@dataclass(frozen=True)
class Credit:
    """CREDIT (server -> device): `credits` more batches may be sent; batches up to `acked_seq` and
    the first `samples_done` samples are trained; `stop_streaming`: send no more batches, only DONE."""

    credits: int = rule(min=0)
    acked_seq: int = rule()
    samples_done: int = rule(min=0)
    stop_streaming: bool = False

    def to_meta(self) -> dict:
        meta = {"credits": self.credits, "acked_seq": self.acked_seq, "samples_done": self.samples_done}
        if self.stop_streaming:
            meta["stop_streaming"] = True
        return meta

    @classmethod
    def from_meta(cls, meta: dict) -> "Credit":
        return _load(cls, meta, "bad_credit", "CREDIT")


@dataclass(frozen=True)
class BitPlan:
    """BITPLAN (server -> device): per-tap importance (RMS gradient w.r.t. the dequantized tap) at `step`."""

    importance: list[float]
    step: int = rule(min=0)

    def to_meta(self) -> dict:
        return {"importance": list(self.importance), "step": self.step}

    @classmethod
    def from_meta(cls, meta: dict) -> "BitPlan":
        plan = _load(cls, meta, "bad_bitplan", "BITPLAN")
        return cls([float(v) for v in plan.importance], plan.step)


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
    taps: list[TapSpec]
    metrics: dict
    federated: FedModel | None = None

    def to_meta(self) -> dict:
        meta = {"config": self.config, "inputs": side_input_names(self.n_taps), "output": SIDE_OUTPUT,
                "task": self.task, "task_type": self.task_type, "num_labels": self.num_labels, "run": self.run,
                "taps": [t.to_meta() for t in self.taps]}
        if self.federated is not None:
            meta["federated"] = self.federated.to_meta()
        meta["metrics"] = self.metrics
        return meta

    @classmethod
    def check(cls, meta: dict) -> dict:
        """Validate a received MODEL meta (the device keeps the dict as it came, unknown keys too)."""
        _load(_ModelContract, meta, "bad_model", "MODEL")
        return meta


def _check_inputs(inputs: list) -> str | None:
    if inputs != side_input_names(len(inputs) - 1):
        return f"{inputs!r} are not the side-network contract tap0..tapN, {SIDE_MASK} -> {SIDE_OUTPUT}"
    return None


def _check_pooling(config: dict) -> str | None:
    return None if isinstance(config.get("pooling", "last"), str) else "pooling must be a string"


@dataclass(frozen=True)
class _ModelContract:
    """What a device checks of a MODEL meta before it feeds the graph."""

    config: dict = rule(check=_check_pooling)
    inputs: list[str] = rule(check=_check_inputs)
    output: str = rule(choices=(SIDE_OUTPUT,))
    metrics: dict = rule(default_factory=dict)


@dataclass(frozen=True)
class StreamDone:
    """DONE (device -> server): the device has no more batches to send."""

    samples: int

    def to_meta(self) -> dict:
        return {"samples": self.samples}


@dataclass(frozen=True)
class TrainingDone:
    """DONE (server -> device), after MODEL: training finished."""

    samples_trained: int = rule(min=0)
    steps: int = rule(min=0)

    def to_meta(self) -> dict:
        return {"samples_trained": self.samples_trained, "steps": self.steps}

    @classmethod
    def from_meta(cls, meta: dict) -> "TrainingDone":
        return _load(cls, meta, "bad_done", "DONE")


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
