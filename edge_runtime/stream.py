"""`edge-run train`: forward passes on the device, quantized taps streamed to the server.

Two sides, never waiting on each other:
- a producer thread tokenizes, runs the ORT backbone and builds wire batches, a few ahead;
- an asyncio sender streams them while it holds server credits, and a receiver handles
  credits, acknowledgements, bit plans and, at the end, the trained side network.
The device never waits for a gradient: only a full prefetch queue (no credits for a while)
pauses the producer. Dropped connections (mid-frame or mid-handshake), a restarting server and
ERROR `shutting_down` are retried with jittered exponential back-off; acknowledged samples are
never sent again, unacknowledged ones are re-sent from memory, and if the server resumed from a
checkpoint older than its acknowledgements the producer computes those batches again. Failures
no retry can fix end the run at once with the likely cause (failures.py). What each server frame
means, and what a resume re-sends, is decided by the transport-free core in protocol.py.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import random
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import websockets

from mobillm.common import wire
from mobillm.common.errors import BadInput, MobillmError
from mobillm.common.manifest import manifest_digest
from mobillm.common.messages import NAME_RULE, Hello, is_name
from mobillm.common.options import option
from mobillm.common.procfs import peak_rss_mb
from mobillm.common.tasks import Task
from mobillm.kernels import codec

from .backbone import Backbone
from .batches import build_batch, fixed_formats, plan_batches
from .bitplan import UplinkMeter, auto_rule
from .data import Example
from .distortion import make_planner
from .failures import RETRYABLE, ServerError, check_server_url, final_error, refusal, retry_reason
from .protocol import (Credited, DeviceSession, Finished, Ledger, ModelReceived, Phase, Planned, Redirected, Refused,
                       Sent, Welcomed, read_frame, resume_point)

log = logging.getLogger("mobillm.edge")

@dataclass
class TrainOptions:
    """How a device streams one training run; the fields with a flag are `edge-run train`'s options."""

    server: str = option("ws://127.0.0.1:8765", "trainer server URL, ws:// or wss://")
    epochs: int = option(1, "passes over the data")
    batch_size: int = option(16, "rows per forward pass")
    max_len: int = option(128, "truncate rows to this many tokens")
    mode: str | None = option(None, "summary: per sample the last token and the masked mean of its tokens (engines "
                                    "with a summary row); pooled: only the last token; tokens: every real token "
                                    "(default: summary where the engine has it, else pooled)", flag="send",
                              choices=tuple(sorted(wire.MODES)))
    bits: str = option("engine", f"engine (formats in the graph), a format ({', '.join(codec.FORMATS)}) or a comma "
                                 "list per tap, or auto[:RULE] to adapt to the measured uplink: auto = auto:utility "
                                 "(importance x distortion gain per byte, nf4/int8/fp16), auto:paper (MobiLLM "
                                 "Algorithm 2, int4/nf4/fp8/int8/fp16); best with an engine exported with "
                                 "--quant fp16 --tap-formats int4,nf4,fp8,int8,fp16")
    latency_target_s: float = option(0.5, "auto bits: seconds one batch may take to send", flag="latency-target",
                                      metavar="SECONDS")
    prefetch: int = option(4, "batches computed ahead of the sender", cli=False)
    seed: int = option(0, "data order seed (resuming needs the same seed)")
    device_id: str = option("device-0", "stable id of this device (used to resume)")
    run: str | None = option(None, "run name on the server (default: chosen by the server)")
    token: str | None = option(None, "bearer token the server expects (edge-run reads it from --token-file)",
                               cli=False)
    ca: str | None = option(None, "CA certificate to verify a wss:// server (default: the system's; verification "
                                  "is never off)")
    max_retries: int = option(8, "consecutive reconnects without progress (no new acknowledgement) before "
                                 "giving up", cli=False)
    retry_base_s: float = option(0.25, "back-off: base * 2^(attempt-1), capped, times a random 0.5..1 (jitter)",
                                 cli=False)
    retry_max_s: float = option(8.0, "back-off cap, seconds", cli=False)
    connect_timeout_s: float = option(10.0, "seconds to open a connection and get WELCOME", cli=False)
    side_out: str | None = option(None, "where to save the returned side network (default: ENGINE/side_TASK.onnx)")
    progress: bool = option(True, "progress bars (edge-run: off with -q)", cli=False)

    def check(self) -> None:
        """BadInput for a --server that is no WebSocket URL or a --device-id / --run the server would refuse."""
        check_server_url(self.server)
        for flag, value in (("--device-id", self.device_id), ("--run", self.run)):
            if value is not None and not is_name(value):
                raise BadInput(f"{flag} {value!r}: a name is {NAME_RULE}")


@dataclass
class TrainStats:
    batches_sent: int = 0
    samples_sent: int = 0
    bytes_sent: int = 0
    forward_s: float = 0.0
    send_s: float = 0.0
    producer_wait_s: float = 0.0  # producer blocked because the prefetch queue was full
    reconnects: int = 0
    reconnect_reasons: list = field(default_factory=list)  # why each reconnect happened
    truncated_rows: int = 0
    wall_s: float = 0.0
    stream_s: float = 0.0  # start until DONE was sent: the device's part of the run
    peak_rss_mb: float = 0.0
    bit_plans: list = field(default_factory=list)
    server_metrics: dict = field(default_factory=dict)
    error: dict | None = None  # why the run ended without a side network: {"code", "message"}


class Producer:
    """A thread computing BATCH frames from one start point, in order, a few ahead of the sender
    (`queue`, `prefetch` deep): only a full queue pauses it. `stop` ends this producer (a restart,
    or the server stopped the streaming); `halt` ends every producer (the run is over)."""

    def __init__(self, compute: Callable[[int], bytes], sizes: list[int], start_batch: int, start_sample: int,
                 prefetch: int, halt: threading.Event, stats: TrainStats):
        self.queue: asyncio.Queue = asyncio.Queue(maxsize=prefetch)  # Sent, then None (or the exception)
        self.stop = threading.Event()
        self.finished = False  # the sender took the last batch
        self._halt, self._stats, self._loop = halt, stats, asyncio.get_running_loop()
        self.thread = threading.Thread(target=self._produce, args=(compute, sizes, start_batch, start_sample),
                                       daemon=True, name="edge-producer")
        self.thread.start()

    def _stopped(self) -> bool:
        return self._halt.is_set() or self.stop.is_set()

    def _produce(self, compute: Callable[[int], bytes], sizes: list[int], start_batch: int, end: int) -> None:
        try:
            for b in range(start_batch, len(sizes)):
                if self._stopped():
                    return
                frame = compute(b)
                end += sizes[b]
                t1 = time.perf_counter()
                if not self._put(Sent(b, end, frame, sizes[b])):
                    return
                self._stats.producer_wait_s += time.perf_counter() - t1
        except Exception as exc:  # surfaced to the event loop, which re-raises it
            self._put(exc)
            return
        self._put(None)

    def _put(self, item: Sent | Exception | None) -> bool:
        """Hand `item` to the event loop, waiting while the prefetch queue is full; False once stopped."""
        try:
            fut = asyncio.run_coroutine_threadsafe(self.queue.put(item), self._loop)
        except RuntimeError:  # the event loop is gone: the run ended
            return False
        while True:
            try:
                fut.result(timeout=0.2)
                return True
            except TimeoutError:
                if self._stopped():
                    fut.cancel()
                    return False


def send_mode(opts: TrainOptions, manifest) -> str:
    """The rows this device sends: --send, or by default the summary rows where the engine has them,
    else the last token. Resolved once per client (`StreamClient.mode`)."""
    return opts.mode or ("summary" if manifest.summary_row else "pooled")


class StreamClient:
    """One device's side of a training run: forward passes here, taps streamed to the server that trains.

    The protocol's decisions (handshake, redirects, credits, resume, refusals) are `DeviceSession`'s
    and `Ledger`'s (protocol.py); this class computes the batches and moves the frames."""

    def __init__(self, backbone: Backbone, examples: list[Example], task: Task, opts: TrainOptions):
        mode = send_mode(opts, backbone.manifest)
        if mode not in wire.MODES:
            raise ValueError(f"unknown send mode {mode!r}; choose {', '.join(sorted(wire.MODES))}")
        if mode == "summary" and not backbone.manifest.summary_row:
            raise BadInput(f"--send summary: the engine {backbone.folder} has no summary row (exported before "
                           f"--summary-row); re-export it, or send pooled or tokens")
        opts.check()
        self.bb, self.examples, self.task, self.opts, self.mode = backbone, examples, task, opts, mode
        self.stats = TrainStats()
        self.rows, self.stats.truncated_rows = self._tokenize()
        label_dtype = np.float32 if task.kind == "regression" else np.int64
        self.labels = np.array([e.label for e in examples], dtype=label_dtype)
        self.batches = plan_batches(np.array([len(r) for r in self.rows]), opts.batch_size, opts.epochs, opts.seed)
        self.total_samples = sum(len(b) for b in self.batches)
        specs = backbone.manifest.taps
        self.fixed_plan, self.planner, self.plan_in_graph = fixed_formats(opts.bits, len(specs)), None, False
        rule = auto_rule(opts.bits)  # None unless --bits auto[:RULE]
        if rule is not None:
            self.planner, self.plan_in_graph = make_planner(backbone, self.rows, rule, opts.latency_target_s)
        self.session = DeviceSession(opts.server)
        self.ledger = Ledger()
        self._producer: Producer | None = None
        self._opened = False  # a WebSocket to the server has opened (so its scheme, ws or wss, is right)
        self._stop = threading.Event()  # the run is over: every producer ends
        self._rng = random.Random()

    @property
    def model_bytes(self) -> bytes | None:
        """The returned side network (ONNX), once it arrived."""
        return self.session.model

    @property
    def model_meta(self) -> dict:
        return self.session.model_meta or {}

    def _tokenize(self) -> tuple[list[np.ndarray], int]:
        rows, cut = [], 0
        for ex in self.examples:
            ids, truncated = self.bb.tokenize(ex.texts, self.opts.max_len)
            rows.append(ids)
            cut += truncated
        if cut:
            log.warning("%d of %d rows were longer than %d tokens and were truncated", cut, len(rows),
                        min(self.opts.max_len, self.bb.max_length))
        return rows, cut

    def hello(self) -> dict:
        """The HELLO meta: this engine, task and run. `num_layers` lets federated servers align taps by depth."""
        m = self.bb.manifest
        return Hello(manifest_digest(self.bb.folder), m.model_id, self.task.name, self.task.kind,
                     self.task.num_labels, self.mode, tuple(m.taps), self.opts.device_id, self.opts.run,
                     self.opts.epochs, len(self.examples), self.opts.token, self.opts.bits, m.num_layers).to_meta()

    def _batch_frame(self, b: int) -> bytes:
        """Batch `b`'s forward pass, quantized taps and BATCH frame (on the producer's thread)."""
        idx = self.batches[b]
        t0 = time.perf_counter()
        per_sample = wire.ROWS_PER_SAMPLE.get(self.mode)
        tokens = per_sample * len(idx) if per_sample else sum(len(self.rows[i]) for i in idx)
        plan = self.planner.next_plan(tokens) if self.planner else self.fixed_plan
        taps, lengths = self.bb.forward([self.rows[i] for i in idx], keep=self.mode,
                                        formats=plan if self.plan_in_graph else None)
        frame = wire.batch_frame(build_batch(b, idx, self.labels[idx], taps, lengths, self.mode, plan))
        self.stats.forward_s += time.perf_counter() - t0
        return frame

    # -- asyncio side --------------------------------------------------------------------
    def run(self) -> TrainStats:
        """Stream the whole run; returns statistics. The side network is in `self.model_bytes`."""
        self._t0 = t0 = time.perf_counter()
        try:
            asyncio.run(self._run())
        except MobillmError as exc:
            self.stats.error = {"code": getattr(exc, "code", type(exc).__name__), "message": str(exc)}
            raise
        finally:
            self._stop.set()
            self.stats.wall_s = time.perf_counter() - t0
            self.stats.peak_rss_mb = peak_rss_mb()
            if self.planner:
                self.stats.bit_plans = self.planner.history
        return self.stats

    async def _run(self):
        try:
            await self._run_sessions()
        finally:
            self._stop.set()
            if self._producer is not None:
                await asyncio.to_thread(self._producer.thread.join, 5)

    async def _run_sessions(self):
        """Connect until the side network arrives. `max_retries` counts consecutive attempts that
        made no progress; an attempt that got a new acknowledgement starts the count again."""
        attempt = 0
        while True:
            try:
                outcome = await self._session()
                if outcome is Phase.REDIRECTED:
                    continue  # at once: the rank that owns this device is waiting
                if outcome is Phase.FINISHED:
                    return
                reason = "closed before DONE"
            except (*RETRYABLE, websockets.InvalidStatus, wire.WireError) as exc:
                # the URL that failed (maybe a rank's) names the cause
                final = await final_error(exc, self.session.url, probe=not self._opened)
                if final is not None:
                    raise final from None
                reason = retry_reason(exc)
                detail = f"{exc.__class__.__name__}: {exc}"
            else:
                detail = reason
            attempt = 1 if self.session.lost() else attempt + 1
            if attempt > self.opts.max_retries:
                raise ServerError(f"cannot reach the server at {self.opts.server} after "
                                  f"{self.opts.max_retries} retries ({detail})", "unreachable")
            delay = min(self.opts.retry_base_s * 2 ** (attempt - 1), self.opts.retry_max_s) * self._rng.uniform(0.5, 1)
            log.warning("connection lost (%s); reconnecting in %.2fs", reason, delay)
            self.stats.reconnects += 1
            self.stats.reconnect_reasons.append(reason)
            await asyncio.sleep(delay)

    def _ssl(self):
        if not self.session.url.startswith("wss://"):
            return None
        import ssl

        try:
            return ssl.create_default_context(cafile=self.opts.ca)  # always verifies; --ca adds a trust root
        except (OSError, ssl.SSLError) as exc:
            raise BadInput(f"--ca {self.opts.ca}: not a readable PEM certificate ({exc})") from None

    async def _session(self) -> Phase:
        """One connection. Returns FINISHED when the run is complete (model received), REDIRECTED when
        WELCOME sent this device to another rank, else the phase the connection ended in."""
        async with websockets.connect(self.session.url, max_size=wire.MAX_MODEL_FRAME, ssl=self._ssl(),
                                      open_timeout=self.opts.connect_timeout_s, compression=None) as ws:
            self._opened = True
            try:
                await ws.send(self.session.open(self.hello()))
            except websockets.ConnectionClosed:
                pass  # the server refused before reading HELLO (e.g. bad_path): its ERROR frame is still to read
            event = self.session.receive(read_frame(await asyncio.wait_for(ws.recv(), self.opts.connect_timeout_s)))
            if isinstance(event, Refused):
                raise refusal(event.report)
            if isinstance(event, Redirected):
                return Phase.REDIRECTED
            assert isinstance(event, Welcomed), event  # DeviceSession.receive: nothing else answers a HELLO
            done_before = event.welcome.samples_done
            self.ledger.acknowledge(samples_done=done_before)
            producer = self._producer
            stopped_early = producer is not None and producer.stop.is_set() and not producer.finished
            if (producer is None or done_before < self.ledger.retained_from()
                    or (stopped_early and not event.welcome.stop_streaming)):
                await self._start_producer(done_before)
            credited = asyncio.Event()
            receiver = asyncio.create_task(self._receive(ws, credited))
            try:
                await self._send_all(ws, credited, receiver)
                await receiver
            finally:
                receiver.cancel()
            if self.session.phase is Phase.FINISHED:
                try:  # the side network is here; a link lost now changes nothing
                    await ws.send(self.session.bye())
                except websockets.ConnectionClosed:
                    pass
            return self.session.phase

    async def _start_producer(self, samples_done: int) -> None:
        """(Re)start the producer at the server's resume point. A restart happens when the server resumed
        from a checkpoint older than batches it had acknowledged (it crashed): they are computed again."""
        if self._producer is not None:
            log.warning("the server resumed at sample %d, before batches it had acknowledged; computing them again",
                        samples_done)
            self._producer.stop.set()
            await asyncio.to_thread(self._producer.thread.join)
        sizes = [len(b) for b in self.batches]
        start_batch, start_sample = resume_point(sizes, samples_done)
        self.ledger.restart(start_sample)
        self._producer = Producer(self._batch_frame, sizes, start_batch, start_sample, self.opts.prefetch,
                                  self._stop, self.stats)

    async def _send(self, ws, item: Sent, credited: asyncio.Event, receiver: asyncio.Task):
        # Send time (stats) includes the credit wait; the uplink meter times delivery instead (send_timed).
        t0 = time.perf_counter()
        while not self.session.take_credit():
            credited.clear()
            await _unless_closed(credited.wait(), receiver)
        await send_timed(ws, item.frame, self.planner.meter if self.planner else None)
        self.stats.send_s += time.perf_counter() - t0
        self.stats.bytes_sent += len(item.frame)

    async def _send_all(self, ws, credited: asyncio.Event, receiver: asyncio.Task):
        producer = self._producer
        assert producer is not None, "_session starts a producer before streaming"
        for item in list(self.ledger.unacked):  # re-send what the server never acknowledged
            await self._send(ws, item, credited, receiver)
        while not producer.finished and not self.session.stop_streaming:
            item = await _unless_closed(producer.queue.get(), receiver)
            if isinstance(item, BaseException):
                raise item
            if item is None:
                producer.finished = True
                break
            self.ledger.sent(item)
            await self._send(ws, item, credited, receiver)
            self.stats.batches_sent += 1
            self.stats.samples_sent += item.n
        if self.session.stop_streaming:
            producer.stop.set()  # the server trains on from its cache: no more forward passes
        if not self.stats.stream_s:
            self.stats.stream_s = time.perf_counter() - self._t0
        await ws.send(self.session.finish(self.total_samples))

    async def _receive(self, ws, credited: asyncio.Event):
        async for data in ws:
            event = self.session.receive(read_frame(data))
            if isinstance(event, Credited):
                credited.set()
                self.ledger.acknowledge(event.credit.acked_seq, event.credit.samples_done)
            elif isinstance(event, Planned):
                if self.planner:
                    self.planner.importance = event.plan.importance
            elif isinstance(event, ModelReceived):
                self.stats.server_metrics = event.meta.get("metrics", {})
            elif isinstance(event, Refused):
                raise refusal(event.report)
            elif isinstance(event, Finished):
                return

    def save_model(self, path: Path | str) -> Path:
        """Write the returned side network (ONNX) and its metadata (JSON beside it), atomically."""
        if self.model_bytes is None:
            raise ServerError("no side network was received")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".onnx.part")
        tmp.write_bytes(self.model_bytes)
        tmp.replace(path)
        # The engine it was trained on, so predict/bundle/serve refuse it on another (edge_runtime/predict.py).
        meta = dict(self.model_meta, task=self.task.name, engine=str(self.bb.folder), mode=self.mode,
                    preparation=self.bb.manifest.preparation, model_id=self.bb.manifest.model_id,
                    engine_sha256=manifest_digest(self.bb.folder))
        path.with_suffix(".json").write_text(json.dumps(meta, indent=2))
        return path


async def send_timed(ws, frame: bytes, meter: UplinkMeter | None) -> None:
    """Send `frame`; with a meter, a WebSocket ping right behind it times the frame's delivery. The
    peer's WebSocket layer answers a ping once it has read every byte before it, so the pong's
    arrival follows the link, not the socket buffers a send returns into (and not the server's
    training pace, which only delays CREDITs). The device does not wait for the pong."""
    started = time.perf_counter()
    await ws.send(frame)
    if meter is not None:
        pong = await ws.ping()
        pong.add_done_callback(functools.partial(_delivered, meter, len(frame), started))


def _delivered(meter: UplinkMeter, nbytes: int, started: float, pong: asyncio.Future) -> None:
    if not pong.cancelled() and pong.exception() is None:  # no pong: the connection closed, nothing to learn
        meter.delivered(nbytes, started, time.perf_counter())


async def _unless_closed(coro, receiver: asyncio.Task):
    """Await `coro`, unless the connection ends first: then raise why (to trigger a reconnect)."""
    task = asyncio.ensure_future(coro)
    await asyncio.wait([task, receiver], return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        return task.result()
    task.cancel()
    error = receiver.exception()
    if error is not None:
        raise error
    raise websockets.ConnectionClosedOK(None, None)


def stats_dict(stats: TrainStats) -> dict:
    return asdict(stats)
