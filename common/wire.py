"""The wire format between device and server: the one definition both sides import.

Every WebSocket message is one binary frame:

    header (16 bytes, little-endian)  magic b"MBLM" | version u8 | type u8 | flags u16 |
                                      meta_len u32 | body_len u32
    meta   (meta_len bytes)           UTF-8 JSON object of small control fields (never tensors)
    body   (body_len bytes)           raw binary payload (a batch, or an ONNX file)

A BATCH body is padding-free: only the real tokens of each row travel (ragged rows, their
lengths in the body), or only the rows the head reads (`pooled` mode: the last token; `summary`
mode: the last token, then the masked mean of the row's tokens, two rows a sample). Layout in
`docs/protocol.md`. Nothing here imports more than numpy; no pickle, ever.
"""

from __future__ import annotations

import enum
import json
import struct
from dataclasses import dataclass, field

import numpy as np

from mobillm.kernels import codec

MAGIC = b"MBLM"
VERSION = 1
HEADER = struct.Struct("<4sBBHII")
DEFAULT_MAX_FRAME = 64 * 1024 * 1024  # bytes; checked before anything is allocated
MAX_META = 64 * 1024
MAX_MODEL_FRAME = 256 * 1024 * 1024  # a MODEL frame (side network ONNX) may exceed DEFAULT_MAX_FRAME


class MsgType(enum.IntEnum):
    HELLO = 1  # device -> server: who I am, what I send
    WELCOME = 2  # server -> device: session accepted, initial credits, resume point
    ERROR = 3  # either way: what was wrong; the sender closes the session after it
    BATCH = 4  # device -> server: quantized taps + labels of one batch
    CREDIT = 5  # server -> device: more batches may be sent; acknowledgements
    BITPLAN = 6  # server -> device: layer importance / bitwidth plan
    DONE = 7  # device -> server: no more data; server -> device: training finished
    MODEL = 8  # server -> device: trained side network (ONNX bytes) + its config
    BYE = 9  # either way: orderly close


FORMAT_IDS = codec.WIRE_FORMAT_IDS  # int8 1, fp8 2, int4 3, nf4 4, fp16 5 (kernels/codec.py)
FORMAT_NAMES = {v: k for k, v in FORMAT_IDS.items()}
MODES = {"tokens": 0, "pooled": 1, "summary": 2}
ROWS_PER_SAMPLE = {"pooled": 1, "summary": 2}  # fixed rows per sample; tokens mode: the sample's length
MODE_NAMES = {v: k for k, v in MODES.items()}
LABEL_KINDS = {"class": 0, "regression": 1}
LABEL_DTYPES: dict[int, np.dtype] = {0: np.dtype("<i8"), 1: np.dtype("<f4")}

BATCH_HEADER = struct.Struct("<QIHBB")  # seq, n_rows, n_taps, mode, label_kind
TAP_HEADER = struct.Struct("<BBHIQI")  # fmt, tap index, block_size, hidden, codes_nbytes, scales_nbytes
# block_size 0 (codec.PER_TENSOR): one scale for the tap's whole tensor, sent once (scales_nbytes 2).


class WireError(ValueError):
    """A frame that does not follow this module's rules. The message says which rule."""


@dataclass
class Frame:
    type: MsgType
    meta: dict = field(default_factory=dict)
    body: bytes | memoryview = b""
    flags: int = 0


def encode_frame(msg_type: MsgType, meta: dict | None = None, body: bytes | memoryview = b"", flags: int = 0) -> bytes:
    """Serialise one message."""
    meta_bytes = json.dumps(meta or {}, separators=(",", ":")).encode()
    if len(meta_bytes) > MAX_META:
        raise WireError(f"meta of {len(meta_bytes)} bytes exceeds {MAX_META}")
    header = HEADER.pack(MAGIC, VERSION, int(msg_type), flags, len(meta_bytes), len(body))
    return b"".join([header, meta_bytes, body])


def decode_frame(data: bytes | bytearray | memoryview | str, max_frame: int = DEFAULT_MAX_FRAME,
                 max_model_frame: int | None = None) -> Frame:
    """Parse and validate one message; raises WireError on any inconsistency.

    `max_model_frame`: the larger limit a MODEL frame may have (the device passes MAX_MODEL_FRAME);
    None: MODEL frames get `max_frame` like every other type (the server, which never receives one)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireError("text frames are not part of the protocol; send binary frames")
    largest = max(max_frame, max_model_frame or 0)
    if len(data) > largest:
        raise WireError(f"frame of {len(data)} bytes exceeds the limit of {largest}")
    if len(data) < HEADER.size:
        raise WireError(f"truncated frame: {len(data)} bytes, header needs {HEADER.size}")
    magic, version, msg_type, flags, meta_len, body_len = HEADER.unpack_from(data, 0)
    limit = max_model_frame if max_model_frame and msg_type == MsgType.MODEL else max_frame
    if len(data) > limit:
        raise WireError(f"frame of {len(data)} bytes exceeds the limit of {limit}")
    if magic != MAGIC:
        raise WireError("bad magic: not a mobillm frame")
    if version != VERSION:
        raise WireError(f"protocol version {version} not supported (this side speaks {VERSION})")
    try:
        msg_type = MsgType(msg_type)
    except ValueError:
        raise WireError(f"unknown message type {msg_type}") from None
    if meta_len > MAX_META:
        raise WireError(f"meta of {meta_len} bytes exceeds {MAX_META}")
    if HEADER.size + meta_len + body_len != len(data):
        raise WireError(f"frame length {len(data)} does not match header ({HEADER.size}+{meta_len}+{body_len})")
    view = memoryview(data)
    try:
        meta = json.loads(bytes(view[HEADER.size:HEADER.size + meta_len]) or b"{}")
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WireError(f"meta is not valid JSON: {exc}") from None
    except RecursionError:  # e.g. 64 KiB of '[': nesting deeper than the parser's stack
        raise WireError("meta JSON is nested too deeply") from None
    if not isinstance(meta, dict):
        raise WireError("meta must be a JSON object")
    return Frame(msg_type, meta, view[HEADER.size + meta_len:], flags)


@dataclass
class TapPayload:
    """One tap of one batch: codes [tokens, code_bytes] (uint8; fp16 format: float16) and scales [tokens, nb]
    (per-tensor, block_size 0: [tokens, 1], every row holding the tensor's scale; sent once)."""

    fmt: str
    block_size: int
    hidden: int
    codes: np.ndarray
    scales: np.ndarray
    index: int = 0

    def decode(self) -> np.ndarray:
        """fp32 [tokens, hidden] via the reference codec (the device and tests use this)."""
        return codec.decode_arrays(self.codes, self.scales, self.fmt, self.hidden, self.block_size)


@dataclass
class Batch:
    """One batch on the wire. Rows are ragged: row i has lengths[i] consecutive tokens in each tap."""

    seq: int
    sample_ids: np.ndarray  # uint64 [n_rows]
    labels: np.ndarray  # int64 (classes) or float32 (regression) [n_rows]
    lengths: np.ndarray  # uint32 [n_rows]; all 1 in pooled mode
    taps: list[TapPayload]
    mode: str = "tokens"

    @property
    def n_tokens(self) -> int:
        return int(self.lengths.sum())

    def to_body(self) -> bytes:
        n = len(self.sample_ids)
        label_kind = 1 if np.asarray(self.labels).dtype.kind == "f" else 0
        parts = [
            BATCH_HEADER.pack(self.seq, n, len(self.taps), MODES[self.mode], label_kind),
            np.ascontiguousarray(self.sample_ids, dtype="<u8").tobytes(),
            np.ascontiguousarray(self.labels, dtype=LABEL_DTYPES[label_kind]).tobytes(),
            np.ascontiguousarray(self.lengths, dtype="<u4").tobytes(),
        ]
        for i, tap in enumerate(self.taps):
            codes = np.ascontiguousarray(tap.codes)
            scales = np.ascontiguousarray(tap.scales, dtype="<f2")
            if tap.block_size == codec.PER_TENSOR and tap.fmt != "fp16":
                scales = _tensor_scale(scales, i)
            parts.append(TAP_HEADER.pack(FORMAT_IDS[codec.check_format(tap.fmt)], tap.index if tap.index else i,
                                         tap.block_size, tap.hidden, codes.nbytes, scales.nbytes))
            parts += [codes.tobytes(), scales.tobytes()]
        return b"".join(parts)

    @classmethod
    def from_body(cls, body: bytes | memoryview, max_rows: int = 1 << 16, max_tokens: int = 1 << 22) -> "Batch":
        """Parse a BATCH body, checking every size against the declared shapes before reading it."""
        view = memoryview(body)
        r = _Reader(view)
        seq, n, n_taps, mode, label_kind = r.unpack(BATCH_HEADER)
        if mode not in MODE_NAMES:
            raise WireError(f"unknown send mode {mode}")
        if label_kind not in LABEL_DTYPES:
            raise WireError(f"unknown label kind {label_kind}")
        if not 0 < n <= max_rows:
            raise WireError(f"batch has {n} rows; allowed 1..{max_rows}")
        if not 0 < n_taps <= 256:
            raise WireError(f"batch has {n_taps} taps; allowed 1..256")
        sample_ids = r.array("<u8", n)
        labels = r.array(LABEL_DTYPES[label_kind], n)
        lengths = r.array("<u4", n)
        if lengths.min() < 1:
            raise WireError("every row must carry at least one token")
        tokens = int(lengths.sum(dtype=np.uint64))
        if tokens > max_tokens:
            raise WireError(f"batch has {tokens} tokens; limit {max_tokens}")
        per_sample = ROWS_PER_SAMPLE.get(MODE_NAMES[mode])
        if per_sample is not None and (lengths != per_sample).any():
            raise WireError(f"{MODE_NAMES[mode]} batches carry exactly {per_sample} row(s) per sample")
        if label_kind == 1 and not np.isfinite(labels).all():
            raise WireError("regression labels must be finite")
        taps = []
        for _ in range(n_taps):
            fmt_id, index, block_size, hidden, codes_nbytes, scales_nbytes = r.unpack(TAP_HEADER)
            if fmt_id not in FORMAT_NAMES:
                raise WireError(f"unknown quant format id {fmt_id}")
            fmt = FORMAT_NAMES[fmt_id]
            if not 0 < hidden <= 65536:
                raise WireError(f"tap {index}: bad hidden {hidden}")
            width = codec.code_bytes(fmt, hidden)
            nb = 0 if fmt == "fp16" else codec.n_blocks(hidden, block_size)
            per_tensor = block_size == codec.PER_TENSOR and fmt != "fp16"
            sent_scales = 1 if per_tensor else tokens * nb
            if codes_nbytes != tokens * width or scales_nbytes != sent_scales * 2:
                raise WireError(f"tap {index}: payload sizes ({codes_nbytes}, {scales_nbytes}) do not match "
                                f"{tokens} tokens of {fmt} hidden {hidden} block {block_size}")
            codes_dtype = "<f2" if fmt == "fp16" else np.uint8
            codes = r.array(codes_dtype, tokens * (hidden if fmt == "fp16" else width)).reshape(tokens, -1)
            scales = r.array("<f2", sent_scales)
            scales = np.repeat(scales, tokens) if per_tensor else scales
            scales = scales.reshape(tokens, nb)
            taps.append(TapPayload(fmt, block_size, hidden, codes, scales, index))
        if r.remaining:
            raise WireError(f"{r.remaining} trailing bytes after the last tap")
        return cls(int(seq), sample_ids, labels, lengths, taps, MODE_NAMES[mode])


def _tensor_scale(scales: np.ndarray, index: int) -> np.ndarray:
    """The one scale of a per-tensor tap, from its per-row copies (which must all agree)."""
    flat = scales.reshape(-1)
    if flat.size == 0 or not (flat.view("<u2") == flat.view("<u2")[0]).all():
        raise WireError(f"tap {index}: per-tensor (block size 0) rows must all carry the same scale")
    return flat[:1]


class _Reader:
    def __init__(self, view: memoryview):
        self.view, self.pos = view, 0

    @property
    def remaining(self) -> int:
        return len(self.view) - self.pos

    def take(self, nbytes: int) -> memoryview:
        if nbytes > self.remaining:
            raise WireError(f"truncated body: need {nbytes} bytes at offset {self.pos}, have {self.remaining}")
        out = self.view[self.pos:self.pos + nbytes]
        self.pos += nbytes
        return out

    def unpack(self, st: struct.Struct) -> tuple:
        return st.unpack(self.take(st.size))

    def array(self, dtype, count: int) -> np.ndarray:
        dtype = np.dtype(dtype)
        return np.frombuffer(self.take(dtype.itemsize * count), dtype=dtype, count=count)


def batch_frame(batch: Batch) -> bytes:
    return encode_frame(MsgType.BATCH, None, batch.to_body())

