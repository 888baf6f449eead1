"""Server-side protocol rules: what a valid BATCH is for one session (a valid HELLO is
`mobillm.common.messages.Hello.from_meta`).

`docs/protocol.md` is the prose form of these checks. Every violation raises `ProtocolError`
with a stable code; the server answers it with an ERROR frame and closes that session only.
"""

from __future__ import annotations

import numpy as np

from mobillm.common import wire
from mobillm.common.messages import Hello, ProtocolError

def check_batch(batch: wire.Batch, hello: Hello, formats: list[str] | None) -> None:
    """A parsed BATCH against the session's HELLO: mode, taps (count, widths, block sizes, and the
    formats `hello.formats()` allows), label kind and range. Payload sizes were checked by the parser."""
    if batch.mode != hello.mode:
        raise ProtocolError("bad_batch", f"batch mode {batch.mode!r} differs from the HELLO's {hello.mode!r}")
    if len(batch.taps) != len(hello.taps):
        raise ProtocolError("bad_batch", f"batch has {len(batch.taps)} taps; the HELLO declared {len(hello.taps)}")
    for i, (got, want) in enumerate(zip(batch.taps, hello.taps)):
        fmt = want.fmt if formats is None else formats[i]
        if got.index != i or (formats is not None and got.fmt != fmt) or got.hidden != want.hidden \
                or got.block_size != want.block_size:
            raise ProtocolError("bad_batch", f"tap {i}: got index {got.index} {got.fmt} hidden {got.hidden} block "
                                            f"{got.block_size}; the HELLO (bits {hello.bits!r}) declared "
                                            f"{fmt if formats is not None else 'any format'} hidden {want.hidden} "
                                            f"block {want.block_size}")
    labels = batch.labels
    if hello.task_type == "class":
        if labels.dtype.kind != "i":
            raise ProtocolError("bad_batch", "classification labels must travel as int64 (label kind 0)")
        bad = labels[(labels < 0) | (labels >= hello.num_labels)]
        if len(bad):
            raise ProtocolError("bad_batch", f"label {int(bad[0])} outside 0..{hello.num_labels - 1}")
    elif labels.dtype.kind != "f":
        raise ProtocolError("bad_batch", "regression labels must travel as float32 (label kind 1)")


def accept_batch(body: bytes, hello: Hello, formats: list[str] | None, credits: int, last_seq: int,
                 max_rows: int, max_tokens: int) -> wire.Batch:
    """A BATCH body from a session holding `credits`, whose last accepted seq is `last_seq`: it must
    come with a credit, parse within the server's limits, match the HELLO (`check_batch`) and have
    a larger seq. The caller takes the credit and records the seq."""
    if credits <= 0:
        raise ProtocolError("no_credit", "BATCH sent without a credit; wait for a CREDIT frame")
    try:
        batch = wire.Batch.from_body(body, max_rows, max_tokens)
    except wire.WireError as exc:
        raise ProtocolError("bad_batch", str(exc)) from None
    check_batch(batch, hello, formats)
    if batch.seq <= last_seq:
        raise ProtocolError("bad_batch", f"seq {batch.seq} does not increase (last was {last_seq})")
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
