"""Server-side protocol rules: what a valid HELLO and a valid BATCH are for one session.

`docs/protocol.md` is the prose form of these checks. Every violation raises `SessionError`
with a stable code; the server answers it with an ERROR frame and closes that session only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from mobillm.common import wire
from mobillm.kernels import codec

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
SHA256 = re.compile(r"^[0-9a-f]{64}$")
MAX_TAPS = 256
MAX_EPOCHS = 10_000
MAX_SAMPLES = 1 << 40


class SessionError(Exception):
    """A reason to end one session: `code` goes into the ERROR frame, `message` says what to do."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code, self.message = code, message


@dataclass(frozen=True)
class TapInfo:
    layer: int
    hidden: int
    fmt: str
    block_size: int

    def as_dict(self) -> dict:
        return {"layer": self.layer, "hidden": self.hidden, "fmt": self.fmt, "block_size": self.block_size}


@dataclass(frozen=True)
class Hello:
    """A validated HELLO meta."""

    manifest_sha256: str
    model_id: str
    task: str
    task_type: str
    num_labels: int
    mode: str
    taps: tuple[TapInfo, ...]
    device_id: str
    run: str
    epochs: int
    samples_per_epoch: int
    token: str | None
    bits: str = "engine"
    num_layers: int | None = None  # backbone depth (optional; federated runs align taps by layer / num_layers)

    @property
    def out_dim(self) -> int:
        return 1 if self.task_type == "regression" else self.num_labels

    def formats(self) -> list[str] | None:
        """The format each tap's BATCH payloads must use, or None when they may change batch to batch.

        `bits`: "engine" (default) the HELLO's `fmt` per tap; "auto" any format (the device adapts
        to its uplink, guided by BITPLAN); "<fmt>" every tap in that format; "<f0>,<f1>,..." one per tap."""
        return allowed_formats([t.fmt for t in self.taps], self.bits)

    def identity(self) -> dict:
        """The fields a reconnecting device must repeat exactly to continue a run."""
        return {"task": self.task, "task_type": self.task_type, "num_labels": self.num_labels,
                "model_id": self.model_id, "manifest_sha256": self.manifest_sha256, "mode": self.mode,
                "taps": [t.as_dict() for t in self.taps], "epochs": self.epochs,
                "samples_per_epoch": self.samples_per_epoch, "device_id": self.device_id, "bits": self.bits}

    @classmethod
    def from_meta(cls, meta: dict) -> "Hello":
        """Validate a HELLO meta; unknown extra fields are ignored (forward compatibility)."""
        if meta.get("protocol") != wire.VERSION:
            raise SessionError("version", f"HELLO protocol {meta.get('protocol')!r} is not supported; "
                                          f"this server speaks protocol {wire.VERSION}")
        sha = _field(meta, "manifest_sha256", str)
        if not SHA256.match(sha):
            raise SessionError("bad_hello", "manifest_sha256 must be 64 lowercase hex digits")
        task = _field(meta, "task", str)
        if not NAME.match(task):
            raise SessionError("bad_hello", f"task {task!r} must match {NAME.pattern}")
        task_type = _field(meta, "task_type", str)
        if task_type not in wire.LABEL_KINDS:
            raise SessionError("bad_hello", f"task_type must be one of {list(wire.LABEL_KINDS)}, got {task_type!r}")
        num_labels = _field(meta, "num_labels", int)
        if task_type == "class" and not 2 <= num_labels <= 1 << 20:
            raise SessionError("bad_hello", f"a classification task needs 2..{1 << 20} labels, got {num_labels}")
        if task_type == "regression" and num_labels != 1:
            raise SessionError("bad_hello", f"a regression task has num_labels 1, got {num_labels}")
        mode = _field(meta, "mode", str)
        if mode not in wire.MODES:
            raise SessionError("bad_hello", f"mode must be one of {list(wire.MODES)}, got {mode!r}")
        raw_taps = _field(meta, "taps", list)
        if not 1 <= len(raw_taps) <= MAX_TAPS:
            raise SessionError("bad_hello", f"taps must list 1..{MAX_TAPS} taps, got {len(raw_taps)}")
        taps = tuple(_tap(i, t) for i, t in enumerate(raw_taps))
        device_id = _field(meta, "device_id", str)
        if not NAME.match(device_id):
            raise SessionError("bad_hello", f"device_id {device_id!r} must match {NAME.pattern}")
        run = meta.get("run") or f"{task}-{sha[:12]}"
        if not isinstance(run, str) or not NAME.match(run):
            raise SessionError("bad_hello", f"run {run!r} must match {NAME.pattern} (it names a folder)")
        epochs = _field(meta, "epochs", int)
        samples = _field(meta, "samples_per_epoch", int)
        if not 1 <= epochs <= MAX_EPOCHS or not 1 <= samples <= MAX_SAMPLES:
            raise SessionError("bad_hello", f"epochs must be 1..{MAX_EPOCHS} and samples_per_epoch 1..{MAX_SAMPLES}")
        token = meta.get("token")
        if token is not None and not isinstance(token, str):
            raise SessionError("bad_hello", "token must be a string")
        bits = meta.get("bits") or "engine"
        if not isinstance(bits, str):
            raise SessionError("bad_hello", "bits must be a string: engine, auto, a format, or one format per tap")
        num_layers = meta.get("num_layers")
        if num_layers is not None:
            deepest = max(t.layer for t in taps)
            if not isinstance(num_layers, int) or isinstance(num_layers, bool) or not deepest <= num_layers <= 65536:
                raise SessionError("bad_hello", f"num_layers must be an integer {deepest}..65536 (at least the "
                                                f"deepest tap layer), got {num_layers!r}")
        hello = cls(sha, _field(meta, "model_id", str), task, task_type, num_labels, mode, taps, device_id, run,
                    epochs, samples, token, bits, num_layers)
        try:
            fmts = hello.formats()
        except ValueError as exc:
            raise SessionError("bad_hello", f"bits {bits!r}: {exc}") from None
        if fmts is not None and len(fmts) != len(taps):
            raise SessionError("bad_hello", f"bits lists {len(fmts)} formats for {len(taps)} taps")
        return hello


def allowed_formats(engine_fmts: list[str], bits: str) -> list[str] | None:
    """Per-tap BATCH formats for a HELLO `bits` value (see `Hello.formats`); None: any format."""
    if bits == "engine":
        return list(engine_fmts)
    if bits == "auto":
        return None
    fmts = [codec.check_format(f.strip()) for f in bits.split(",")]
    return fmts * len(engine_fmts) if len(fmts) == 1 else fmts


def _field(meta: dict, name: str, kind: type):
    value = meta.get(name)
    # bool is an int in Python; it is never a valid count here.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise SessionError("bad_hello", f"HELLO field {name!r} must be a {kind.__name__}, got {value!r}")
    return value


def _tap(i: int, tap) -> TapInfo:
    if not isinstance(tap, dict):
        raise SessionError("bad_hello", f"taps[{i}] must be an object")
    values = {k: tap.get(k) for k in ("layer", "hidden", "fmt", "block_size")}
    ints = ("layer", "hidden", "block_size")
    if not all(isinstance(values[k], int) and not isinstance(values[k], bool) for k in ints):
        raise SessionError("bad_hello", f"taps[{i}] needs integer layer, hidden and block_size")
    if values["fmt"] not in codec.FORMATS:
        raise SessionError("bad_hello", f"taps[{i}].fmt must be one of {codec.FORMATS}, got {values['fmt']!r}")
    if not 0 < values["hidden"] <= 65536 or not 0 < values["block_size"] <= 65535 or values["layer"] < 0:
        raise SessionError("bad_hello", f"taps[{i}]: hidden must be 1..65536, block_size 1..65535, layer >= 0")
    return TapInfo(**values)


def check_batch(batch: wire.Batch, hello: Hello, formats: list[str] | None) -> None:
    """A parsed BATCH against the session's HELLO: mode, taps (count, widths, block sizes, and the
    formats `hello.formats()` allows), label kind and range. Payload sizes were checked by the parser."""
    if batch.mode != hello.mode:
        raise SessionError("bad_batch", f"batch mode {batch.mode!r} differs from the HELLO's {hello.mode!r}")
    if len(batch.taps) != len(hello.taps):
        raise SessionError("bad_batch", f"batch has {len(batch.taps)} taps; the HELLO declared {len(hello.taps)}")
    for i, (got, want) in enumerate(zip(batch.taps, hello.taps)):
        fmt = want.fmt if formats is None else formats[i]
        if got.index != i or (formats is not None and got.fmt != fmt) or got.hidden != want.hidden \
                or got.block_size != want.block_size:
            raise SessionError("bad_batch", f"tap {i}: got index {got.index} {got.fmt} hidden {got.hidden} block "
                                            f"{got.block_size}; the HELLO (bits {hello.bits!r}) declared "
                                            f"{fmt if formats is not None else 'any format'} hidden {want.hidden} "
                                            f"block {want.block_size}")
    labels = batch.labels
    if hello.task_type == "class":
        if labels.dtype.kind != "i":
            raise SessionError("bad_batch", "classification labels must travel as int64 (label kind 0)")
        bad = labels[(labels < 0) | (labels >= hello.num_labels)]
        if len(bad):
            raise SessionError("bad_batch", f"label {int(bad[0])} outside 0..{hello.num_labels - 1}")
    elif labels.dtype.kind != "f":
        raise SessionError("bad_batch", "regression labels must travel as float32 (label kind 1)")


def accept_batch(body: bytes, hello: Hello, formats: list[str] | None, credits: int, last_seq: int,
                 max_rows: int, max_tokens: int) -> wire.Batch:
    """A BATCH body from a session holding `credits`, whose last accepted seq is `last_seq`: it must
    come with a credit, parse within the server's limits, match the HELLO (`check_batch`) and have
    a larger seq. The caller takes the credit and records the seq."""
    if credits <= 0:
        raise SessionError("no_credit", "BATCH sent without a credit; wait for a CREDIT frame")
    try:
        batch = wire.Batch.from_body(body, max_rows, max_tokens)
    except wire.WireError as exc:
        raise SessionError("bad_batch", str(exc)) from None
    check_batch(batch, hello, formats)
    if batch.seq <= last_seq:
        raise SessionError("bad_batch", f"seq {batch.seq} does not increase (last was {last_seq})")
    return batch


def trim_batch(batch: wire.Batch, rows: int) -> wire.Batch:
    """The first `rows` rows of a batch (their tokens and labels)."""
    if rows >= len(batch.sample_ids):
        return batch
    tokens = int(batch.lengths[:rows].sum())
    taps = [wire.TapPayload(t.fmt, t.block_size, t.hidden, t.codes[:tokens], t.scales[:tokens], t.index)
            for t in batch.taps]
    return wire.Batch(batch.seq, batch.sample_ids[:rows], batch.labels[:rows], batch.lengths[:rows], taps, batch.mode)


def last_token_rows(lengths: np.ndarray) -> np.ndarray:
    """Index of each row's last token in the packed token axis."""
    return np.cumsum(lengths.astype(np.int64)) - 1
