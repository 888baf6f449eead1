"""A simulated device: synthetic activations, quantized with the real codec, streamed over the real protocol.

For the benchmarks that flood a trainer with devices (bench/micro/trainer.py, bench/micro/scale_out.py), the
server's tests and trying a server without a phone. The protocol is the device's own
(`protocol.DeviceSession`, which `edge-run`'s StreamClient uses too); this module adds only
synthetic data and a blocking WebSocket, numpy and websockets only (no torch, no backbone).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from websockets.sync.client import connect

from mobillm.common import schema, wire
from mobillm.common.messages import Hello
from mobillm.common.taps import TapSpec
from mobillm.kernels import codec

from .protocol import (Credited, DeviceSession, Finished, ModelReceived, Phase, Planned, Redirected, Refused,
                       Welcomed, read_frame)

SHA = "ab" * 32


@dataclass
class SyntheticTask:
    """Separable synthetic data: noise everywhere, a class (or value) direction on each sample's last token.

    Sample k is a pure function of (seed, k); the device's order for epoch e is a seeded permutation."""

    taps: list[TapSpec]  # or their HELLO dicts {"layer", "hidden", "fmt", "block_size"}, loaded here
    n_samples: int = 256
    task_type: str = "class"
    num_labels: int = 2
    min_len: int = 2
    max_len: int = 8
    signal: float = 3.0
    seed: int = 0

    def __post_init__(self):
        self.taps = [t if isinstance(t, TapSpec) else schema.load(TapSpec, t, "taps[]") for t in self.taps]
        rng = np.random.default_rng([self.seed, 1 << 20])
        classes = 1 if self.task_type == "regression" else self.num_labels
        self.directions = [rng.standard_normal((classes, t.hidden)).astype(np.float32) for t in self.taps]

    def label(self, k: int):
        rng = np.random.default_rng([self.seed, k, 1])
        if self.task_type == "regression":
            return np.float32(rng.uniform(-1, 1))
        return int(rng.integers(self.num_labels))

    def sample(self, k: int) -> list[np.ndarray]:
        """fp32 [length, hidden] per tap for sample k."""
        rng = np.random.default_rng([self.seed, k])
        length = int(rng.integers(self.min_len, self.max_len + 1))
        label = self.label(k)
        out = []
        for tap, dirs in zip(self.taps, self.directions):
            x = rng.standard_normal((length, tap.hidden)).astype(np.float32)
            x[-1] += self.signal * (label * dirs[0] if self.task_type == "regression" else dirs[label])
            out.append(x)
        return out

    def order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch, 2]).permutation(self.n_samples)

    def stream(self, epochs: int) -> np.ndarray:
        """Sample ids in the device's deterministic order, all epochs back to back."""
        return np.concatenate([self.order(e) for e in range(epochs)])

    def batch(self, seq: int, ids, mode: str) -> wire.Batch:
        """Quantize the samples `ids` into one BATCH (only last tokens in pooled mode)."""
        samples = [self.sample(int(k)) for k in ids]
        if mode == "pooled":
            samples = [[x[-1:] for x in s] for s in samples]
        lengths = np.array([len(s[0]) for s in samples], np.uint32)
        taps = []
        for i, tap in enumerate(self.taps):
            enc = codec.encode(np.concatenate([s[i] for s in samples]), tap.fmt, tap.block_size)
            taps.append(wire.TapPayload(tap.fmt, tap.block_size, tap.hidden, enc.codes, enc.scales, i))
        labels = np.array([self.label(int(k)) for k in ids],
                          np.float32 if self.task_type == "regression" else np.int64)
        return wire.Batch(seq, np.asarray(ids, np.uint64), labels, lengths, taps, mode)


@dataclass
class DeviceResult:
    """What one connection of a SimDevice saw: the messages' metas as received, and its counters."""

    welcome: dict = field(default_factory=dict)
    model_meta: dict | None = None
    model: bytes | None = None
    done: dict | None = None
    error: dict | None = None
    credits: list[dict] = field(default_factory=list)
    bitplans: list[dict] = field(default_factory=list)
    samples_sent: int = 0
    batches_sent: int = 0
    bytes_sent: int = 0
    stop_streaming: bool = False
    seconds: float = 0.0
    redirects: list[str] = field(default_factory=list)  # ranks this connection was sent to, in order


class SimDevice:
    """Streams a SyntheticTask to a trainer server through the device's own protocol core
    (`DeviceSession`, as `edge-run` does), over a blocking WebSocket."""

    def __init__(self, url: str, data: SyntheticTask, *, task: str = "synth", mode: str = "tokens", epochs: int = 1,
                 batch_size: int = 16, device_id: str = "sim-device", run: str | None = None,
                 token: str | None = None, bits: str | None = None,
                 frame_source: Callable[[int, np.ndarray], bytes] | None = None, num_layers: int | None = None):
        self.url, self.data, self.task, self.mode, self.bits = url, data, task, mode, bits
        self.num_layers = num_layers  # the simulated backbone's depth (HELLO num_layers), when given
        self.epochs, self.batch_size, self.device_id = epochs, batch_size, device_id
        self.run_name, self.token = run, token
        self.frame_source = frame_source or (lambda seq, ids: wire.batch_frame(self.data.batch(seq, ids, self.mode)))

    def hello(self) -> dict:
        """The HELLO meta this device sends."""
        return Hello(SHA, "synthetic", self.task, self.data.task_type,
                     1 if self.data.task_type == "regression" else self.data.num_labels, self.mode,
                     tuple(self.data.taps), self.device_id, self.run_name, self.epochs,
                     self.data.n_samples, self.token, self.bits or "engine", self.num_layers).to_meta()

    def run(self, stop_after_batches: int | None = None, send_done: bool = True,
            timeout: float = 120.0) -> DeviceResult:
        """One connection: stream from the server's resume point, then DONE -> MODEL -> BYE.

        To test resume, `stop_after_batches` drops the connection after that many batches, and
        `send_done=False` drops it once streaming is over; neither sends DONE. A WELCOME that
        redirects (a trainer of several ranks) is followed, as `edge-run` does. An ERROR from the
        server ends the connection with `error` set; a server that breaks the protocol raises."""
        session = DeviceSession(self.url)
        redirects: list[str] = []
        while True:
            result = self._connection(session, stop_after_batches, send_done, timeout)
            if session.phase is not Phase.REDIRECTED:
                result.redirects = redirects
                return result
            redirects.append(session.url)

    def _connection(self, session: DeviceSession, stop_after_batches: int | None, send_done: bool,
                    timeout: float) -> DeviceResult:
        result = DeviceResult()
        t0 = time.perf_counter()
        with connect(session.url, max_size=wire.MAX_MODEL_FRAME, compression=None, open_timeout=timeout) as ws:
            ws.send(session.open(self.hello()))

            def receive(wait: float) -> None:
                """Read one frame into the session and record what it said (TimeoutError: none came)."""
                frame = read_frame(ws.recv(timeout=wait))
                event = session.receive(frame)
                if isinstance(event, (Welcomed, Redirected)):
                    result.welcome = frame.meta
                elif isinstance(event, Credited):
                    result.credits.append(frame.meta)
                    result.stop_streaming = result.stop_streaming or event.credit.stop_streaming
                elif isinstance(event, Planned):
                    result.bitplans.append(frame.meta)
                elif isinstance(event, ModelReceived):
                    result.model_meta, result.model = event.meta, event.model
                elif isinstance(event, Finished):
                    result.done = frame.meta
                elif isinstance(event, Refused):
                    result.error = frame.meta

            try:
                receive(timeout)
                if session.phase is not Phase.STREAMING:  # refused, or redirected
                    return result
                stream = self.data.stream(self.epochs)
                pos, seq = result.welcome["resume"]["samples_done"], 0
                while pos < len(stream) and not session.stop_streaming:
                    if stop_after_batches is not None and result.batches_sent >= stop_after_batches:
                        return result
                    while session.credits <= 0 and not session.stop_streaming:  # back-pressure: a full server queue
                        receive(timeout)
                        if session.phase is Phase.REFUSED:
                            return result
                    while session.phase is Phase.STREAMING:  # take whatever the server already sent, without waiting
                        try:
                            receive(0)
                        except TimeoutError:
                            break
                    if session.phase is Phase.REFUSED:
                        return result
                    if session.stop_streaming:
                        break
                    session.take_credit()
                    ids = stream[pos:pos + self.batch_size]
                    frame = self.frame_source(seq, ids)
                    ws.send(frame)
                    seq += 1
                    pos += len(ids)
                    result.samples_sent += len(ids)
                    result.batches_sent += 1
                    result.bytes_sent += len(frame)
                if not send_done:
                    return result
                ws.send(session.finish(len(stream)))
                while result.done is None and result.error is None:
                    receive(timeout)
                if result.done is not None:
                    ws.send(session.bye())
                return result
            finally:
                result.seconds = time.perf_counter() - t0
