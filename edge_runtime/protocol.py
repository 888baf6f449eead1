"""The device's side of the protocol (docs/protocol.md) as a state machine without a transport.

HELLO -> WELCOME (or a redirect to another rank) -> BATCHes while credits last -> DONE -> MODEL,
DONE -> BYE; ERROR at any point; after a lost link, a resume from the server's acknowledgements.
`DeviceSession` reads the server's frames and tells its caller what they mean (an `Event`) and
what to send next; it opens no socket and computes no batch. `StreamClient` (asyncio, the real
device) and `SimDevice` (blocking, synthetic activations) only move its bytes, so a change to the
protocol is made here once, and tests/edge_runtime/test_protocol.py checks it without a server.
"""

from __future__ import annotations

import enum
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Union

from mobillm.common import messages, wire
from mobillm.common.errors import BadInput
from mobillm.common.messages import BitPlan, Credit, ErrorReport, ModelMeta, StreamDone, TrainingDone, Welcome

from .failures import ServerError, check_server_url

log = logging.getLogger("mobillm.edge")

MAX_REDIRECTS = 3  # redirects in a row before the ranks are taken to disagree on placement


class Phase(enum.Enum):
    """Where one connection is in the session."""

    IDLE = "idle"  # no connection
    HANDSHAKE = "handshake"  # HELLO sent; only WELCOME or ERROR may come
    STREAMING = "streaming"  # BATCHes go out, one credit each
    FINISHING = "finishing"  # DONE sent; MODEL and the server's DONE are to come
    FINISHED = "finished"  # the side network is here: send BYE and close
    REDIRECTED = "redirected"  # WELCOME named another rank: close and connect there
    REFUSED = "refused"  # the server sent ERROR and closes


@dataclass(frozen=True)
class Welcomed:
    """Stream from `welcome.samples_done` (the resume point), `welcome.credits` batches ahead."""

    welcome: Welcome


@dataclass(frozen=True)
class Redirected:
    """Close this connection and open one to `url` (already checked: a WebSocket URL, no TLS downgrade)."""

    url: str


@dataclass(frozen=True)
class Credited:
    """`credit.credits` more batches may go (already counted); drop what it acknowledges."""

    credit: Credit


@dataclass(frozen=True)
class Planned:
    """The server's per-tap importance, for a device that plans its bits."""

    plan: BitPlan


@dataclass(frozen=True)
class ModelReceived:
    """The side network (ONNX bytes) and its checked meta; kept in the session too."""

    model: bytes
    meta: dict


@dataclass(frozen=True)
class Finished:
    """Training is over and the side network is here: send `DeviceSession.bye()` and close."""

    done: TrainingDone


@dataclass(frozen=True)
class Refused:
    """The server sent ERROR (`meta` as received) and closes; `report.code` says whether to retry."""

    report: ErrorReport
    meta: dict


Event = Union[Welcomed, Redirected, Credited, Planned, ModelReceived, Finished, Refused]


def read_frame(data: bytes | bytearray | memoryview | str) -> wire.Frame:
    """A frame from the server (a text message is a WireError): MODEL may be up to MAX_MODEL_FRAME, the rest
    DEFAULT_MAX_FRAME."""
    return wire.decode_frame(data, wire.DEFAULT_MAX_FRAME, max_model_frame=wire.MAX_MODEL_FRAME)


@dataclass
class DeviceSession:
    """One device's run on one server, across connections: where to connect, what the server said.

    Call `open` when a connection is up, `receive` with every frame the server sends, `take_credit`
    before each BATCH, `finish` when no batch is left, and `lost` when a connection ends early."""

    server: str  # the URL the device was given: every reconnect asks it again
    url: str = ""  # where the next connection goes: the server, or the rank it redirected to
    redirects: int = 0  # redirects followed in a row
    resumed_at: int = 0  # the furthest resume point a WELCOME reported
    progressed: bool = False  # a new acknowledgement came since the last lost connection
    phase: Phase = Phase.IDLE
    credits: int = 0  # batches this connection may still send
    stop_streaming: bool = False  # the server trains on from its cache: send no more batches, only DONE
    model: bytes | None = None
    model_meta: dict | None = None
    done: TrainingDone | None = None

    def __post_init__(self) -> None:
        self.url = self.url or self.server

    def open(self, hello: dict) -> bytes:
        """A connection to `url` is up: the HELLO frame to send first."""
        self.phase, self.credits, self.stop_streaming = Phase.HANDSHAKE, 0, False
        return wire.encode_frame(wire.MsgType.HELLO, hello)

    def lost(self) -> bool:
        """The connection (or the attempt to open one) ended before the run did; True when it got a new
        acknowledgement since the last loss (a caller's count of fruitless retries starts again).
        The next connection asks the server again: it sends the device back to the same rank
        (placement is stable) or, after the world restarted, to wherever it is now; a rank that is
        gone is never retried forever."""
        progressed = self.progressed
        self.url, self.redirects, self.phase, self.progressed = self.server, 0, Phase.IDLE, False
        return progressed

    def receive(self, frame: wire.Frame) -> Event | None:
        """What one frame from the server means; None for one the device has no use for.
        ServerError when the server breaks the protocol; ProtocolError for a malformed meta."""
        if frame.type == wire.MsgType.ERROR:
            self.phase = Phase.REFUSED
            return Refused(ErrorReport.from_meta(frame.meta), frame.meta)
        if self.phase is Phase.HANDSHAKE:
            if frame.type != wire.MsgType.WELCOME:
                raise ServerError(f"expected WELCOME, got {frame.type.name}")
            return self._welcome(Welcome.from_meta(frame.meta))
        if frame.type == wire.MsgType.CREDIT:
            credit = Credit.from_meta(frame.meta)
            self.progressed = True
            self.credits += credit.credits
            self.stop_streaming = self.stop_streaming or credit.stop_streaming
            return Credited(credit)
        if frame.type == wire.MsgType.BITPLAN:
            return Planned(BitPlan.from_meta(frame.meta))
        if frame.type == wire.MsgType.MODEL:
            self.model, self.model_meta = bytes(frame.body), ModelMeta.check(frame.meta)
            return ModelReceived(self.model, self.model_meta)
        if frame.type == wire.MsgType.DONE:
            if self.model is None:
                raise ServerError("server finished without sending the side network")
            self.done, self.phase = TrainingDone.from_meta(frame.meta), Phase.FINISHED
            return Finished(self.done)
        return None

    def _welcome(self, welcome: Welcome) -> Welcomed | Redirected:
        if welcome.redirect is not None:
            return self._follow(welcome.redirect)
        self.redirects = 0
        if welcome.samples_done > self.resumed_at:
            self.resumed_at, self.progressed = welcome.samples_done, True
        self.phase, self.credits, self.stop_streaming = Phase.STREAMING, welcome.credits, welcome.stop_streaming
        return Welcomed(welcome)

    def _follow(self, url: str) -> Redirected:
        """WELCOME said another rank owns this device: the next connection goes there."""
        self.redirects += 1
        if self.redirects > MAX_REDIRECTS:
            raise ServerError(f"the server redirected this device {MAX_REDIRECTS} times in a row (last to "
                              f"{url}); its ranks disagree on placement", "redirect_loop")
        try:
            check_server_url(url)
        except BadInput as exc:
            raise ServerError(f"the server redirected this device to a bad URL: {exc}", "bad_redirect") from None
        if self.url.startswith("wss://") and not url.startswith("wss://"):  # HELLO carries the token
            raise ServerError(f"the server redirected this device from TLS to {url}, which would send the token and "
                              f"activations in the clear; the trainer's --rank-url should be wss://", "bad_redirect")
        log.info("redirected to %s", url)
        self.url, self.phase = url, Phase.REDIRECTED
        return Redirected(url)

    def take_credit(self) -> bool:
        """Spend one credit on a BATCH; False while the server has none to give (wait for a CREDIT)."""
        if self.credits <= 0:
            return False
        self.credits -= 1
        return True

    def finish(self, samples: int) -> bytes:
        """No batch is left to send (or the server stopped the streaming): the device's DONE frame."""
        self.phase = Phase.FINISHING
        return messages.frame(StreamDone(samples))

    @staticmethod
    def bye() -> bytes:
        """The last frame, after the server's DONE."""
        return wire.encode_frame(wire.MsgType.BYE)


@dataclass
class Sent:
    """A BATCH frame the server has not acknowledged yet, kept to be sent again after a reconnect."""

    seq: int
    end_sample: int  # position in the run's sample order just after this batch
    frame: bytes
    n: int


@dataclass
class Ledger:
    """What the device sent and what the server acknowledged: the part of a resume the device decides."""

    unacked: deque[Sent] = field(default_factory=deque)
    next_sample: int = 0  # position of the first sample of the next batch to send

    def sent(self, item: Sent) -> None:
        self.unacked.append(item)
        self.next_sample = item.end_sample

    def acknowledge(self, acked_seq: int | None = None, samples_done: int | None = None) -> None:
        """Forget the batches up to `acked_seq`, or those inside the first `samples_done` samples."""
        while self.unacked and (
            (acked_seq is not None and self.unacked[0].seq <= acked_seq)
            or (samples_done is not None and self.unacked[0].end_sample <= samples_done)
        ):
            self.unacked.popleft()

    def retained_from(self) -> int:
        """The first sample this device can still send without computing it again."""
        return self.unacked[0].end_sample - self.unacked[0].n if self.unacked else self.next_sample

    def restart(self, start_sample: int) -> None:
        """Batches are computed again from `start_sample`: nothing retained is sent again."""
        self.unacked.clear()
        self.next_sample = start_sample


def resume_point(batch_sizes: list[int], samples_done: int) -> tuple[int, int]:
    """(first batch, first sample) to compute after the server's resume point `samples_done`;
    ServerError when it falls inside a batch (the run's --batch-size or --seed changed)."""
    pos = 0
    for b, n in enumerate(batch_sizes):
        if pos >= samples_done:
            if pos != samples_done:
                raise ServerError(f"server says {samples_done} samples are done, which is not a batch "
                                  f"boundary of this run; use the same --batch-size and --seed")
            return b, pos
        pos += n
    return len(batch_sizes), pos
