"""Server-side protocol rules: what a valid BATCH is for one session (a valid HELLO is
`mobillm.common.messages.Hello.from_meta`).

`docs/protocol.md` is the prose form of these checks. Every violation raises `ProtocolError`
with a stable code; the server answers it with an ERROR frame and closes that session only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mobillm.common import wire
from mobillm.common.messages import Hello, ProtocolError


@dataclass
class Credits:
    """One session's flow control, owned here so that no other module does the arithmetic: the
    batches its device may still send, the seq it spent the last credit on, and whether it was told
    to stop streaming (after that a freed queue slot grants nothing)."""

    held: int = 0
    last_seq: int = -1
    stopped: bool = False

    def open(self, queue_size: int, stopped: bool) -> None:
        """The session was attached to its run: a full queue's worth, and whether its stream is already complete."""
        self.held, self.stopped = queue_size, stopped

    def check(self) -> None:
        """ERROR `no_credit` when the device sent a BATCH holding none (checked before the body is parsed)."""
        if self.held <= 0:
            raise ProtocolError("no_credit", "BATCH sent without a credit; wait for a CREDIT frame")

    def spend(self, seq: int) -> None:
        """A valid BATCH `seq` was accepted: it takes one credit; seqs must increase."""
        self.check()
        if seq <= self.last_seq:
            raise ProtocolError("bad_batch", f"seq {seq} does not increase (last was {self.last_seq})")
        self.held -= 1
        self.last_seq = seq

    def grant(self) -> int:
        """A queue slot freed: the credits to send back (one, none once streaming stopped)."""
        grant = 0 if self.stopped else 1
        self.held += grant
        return grant

    def stop(self) -> None:
        """The device was told to send no more batches."""
        self.stopped = True

    @property
    def awaited(self) -> bool:
        """The device holds credits it may still spend: silence from it is a timeout, not back-pressure."""
        return self.held > 0 and not self.stopped


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


def accept_batch(body: bytes, hello: Hello, formats: list[str] | None, credits: Credits,
                 max_rows: int, max_tokens: int) -> wire.Batch:
    """A BATCH body from a session with `credits`: it must come with a credit, parse within the
    server's limits, match the HELLO (`check_batch`) and have a larger seq; then it spends the credit."""
    credits.check()
    try:
        batch = wire.Batch.from_body(body, max_rows, max_tokens)
    except wire.WireError as exc:
        raise ProtocolError("bad_batch", str(exc)) from None
    check_batch(batch, hello, formats)
    credits.spend(batch.seq)
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
