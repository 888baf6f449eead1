"""The trainer server: WebSocket sessions in, side networks out.

One asyncio loop (its own thread) receives and validates frames and puts batches on each run's
bounded queue; each run's training thread consumes its queue (see `run.py`), so receiving and
training overlap and the device never waits for a gradient. One run per (task, manifest) pair,
or per explicit run name, each in `runs/<run>/`. `docs/protocol.md` is the message contract.

    server = TrainerServer(ServerConfig(port=0, runs_dir="runs"))
    port = server.start()   # bound port; the server runs in a background thread
    ...
    server.stop()           # checkpoints unfinished runs
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hmac
import itertools
import logging
import threading
from pathlib import Path

import torch
import websockets
from websockets.asyncio.server import ServerConnection, serve

from mobillm.common import wire

from .config import RunConfig, ServerConfig
from .federated import FedCoordinator
from .protocol import Hello, SessionError, accept_batch, trim_batch
from .run import CHECKPOINT, Item, Run, load_checkpoint, make_optimizer

log = logging.getLogger("mobillm.trainer")


class Session:
    """One WebSocket connection: HELLO, WELCOME, then batches until DONE (or an error)."""

    def __init__(self, server: "TrainerServer", ws: ServerConnection, number: int):
        self.server, self.ws, self.id = server, ws, f"s{number}"
        self.hello: Hello | None = None
        self.formats: list[str] | None = None  # per-tap BATCH formats the HELLO allows (None: any)
        self.run: Run | None = None
        self.credits = 0
        self.last_seq = -1
        self.stop_sent = False
        self.failed = False
        self._sends: set[asyncio.Task] = set()

    # Called on the loop by the run's training thread (via call_soon_threadsafe).
    def grant_credit(self, seq: int, samples_done: int) -> None:
        """One queue slot freed: one more credit (none once streaming has stopped)."""
        grant = 0 if self.stop_sent else 1
        self.credits += grant
        self.post(wire.MsgType.CREDIT, {"credits": grant, "acked_seq": seq, "samples_done": samples_done})

    def post_bitplan(self, importance: list[float], step: int) -> None:
        self.post(wire.MsgType.BITPLAN, {"importance": importance, "step": step})

    def post(self, msg_type: wire.MsgType, meta: dict) -> None:
        """Send without waiting (the receive loop never blocks on a send)."""
        task = asyncio.ensure_future(self._send(wire.encode_frame(msg_type, meta)))
        self._sends.add(task)
        task.add_done_callback(self._sends.discard)

    async def _send(self, data: bytes) -> None:
        try:
            await self.ws.send(data)
        except websockets.ConnectionClosed:
            pass

    def detach(self) -> None:
        """Forget the run (on close, or when a reconnect of the same device replaces this session)."""
        if self.run is not None and self.run.session is self:
            self.run.session = None
        self.run = None

    # The session itself.
    async def serve(self) -> None:
        if self.ws.request is None or self.ws.request.path != "/":
            raise SessionError("bad_path", "connect to path '/'")
        try:
            first = await asyncio.wait_for(self.ws.recv(), self.server.config.hello_timeout_s)
        except TimeoutError:
            raise SessionError("timeout", f"no HELLO within {self.server.config.hello_timeout_s:g} s") from None
        frame = self._decode(first)
        if frame.type != wire.MsgType.HELLO:
            raise SessionError("expected_hello", f"the first frame must be HELLO, got {frame.type.name}")
        self.hello = Hello.from_meta(frame.meta)
        self.formats = self.hello.formats()
        self.server.check_token(self.hello)
        if self.server.fed is not None:  # --federated: every device of a task feeds one shared run
            await self.server.fed.serve(self, frame.meta)
            return
        run = await self.server.attach(self, self.hello)
        stop = run.stream_ended or (run.cfg.cache and run.stream_accepted >= run.cfg.samples_per_epoch)
        self.stop_sent = stop
        await self.ws.send(wire.encode_frame(wire.MsgType.WELCOME, {
            "session": self.id, "run": run.cfg.run, "credits": self.credits,
            "resume": {"samples_done": run.stream_trained}, "cache": run.cfg.cache,
            "stop_streaming": stop, "total_samples": run.cfg.total_samples}))
        log.info("session %s: device %s on run %s, resume at %d", self.id, self.hello.device_id, run.cfg.run,
                 run.stream_trained)
        async for message in self.ws:
            frame = self._decode(message)
            if frame.type == wire.MsgType.BATCH:
                self._on_batch(frame, len(message))
            elif frame.type == wire.MsgType.DONE:
                await self._on_done()
                return
            elif frame.type == wire.MsgType.BYE:
                return
            elif frame.type == wire.MsgType.ERROR:
                log.warning("session %s: device reported %s", self.id, frame.meta)
                return
            else:
                raise SessionError("unexpected", f"{frame.type.name} is not a device-to-server message after HELLO")

    def _decode(self, message) -> wire.Frame:
        try:
            return wire.decode_frame(message, self.server.config.max_frame)
        except wire.WireError as exc:
            raise SessionError("bad_frame", str(exc)) from None

    def _on_batch(self, frame: wire.Frame, nbytes: int) -> None:
        run, cfg = self.run, self.server.config
        if self.server.stopping:
            return  # never queued, never acknowledged: the device sends it again after the restart
        if run is None:
            raise SessionError("replaced", "a newer connection of this device took over the run")
        if run.phase == "failed":
            raise SessionError("training_failed", run.error or "training failed")
        batch = accept_batch(frame.body, self.hello, self.formats, self.credits, self.last_seq,
                             cfg.max_rows, cfg.max_tokens)
        self.credits -= 1
        self.last_seq = batch.seq
        run.bytes_received += nbytes
        rc = run.cfg
        limit = rc.samples_per_epoch if rc.cache else rc.total_samples
        room = limit - run.stream_accepted
        if run.stream_ended or room <= 0:
            if rc.cache:
                return  # sent before the device saw stop_streaming: later epochs come from the cache
            raise SessionError("bad_batch", f"more than epochs x samples_per_epoch = {limit} samples")
        if len(batch.sample_ids) > room:
            if not rc.cache:
                raise SessionError("bad_batch", f"more than epochs x samples_per_epoch = {limit} samples")
            batch = trim_batch(batch, room)
        run.stream_accepted += len(batch.sample_ids)
        run.enqueue(Item(batch, nbytes))
        if rc.cache and run.stream_accepted >= rc.samples_per_epoch and not self.stop_sent:
            self.stop_sent = True
            self.post(wire.MsgType.CREDIT, {"credits": 0, "acked_seq": batch.seq, "samples_done": run.stream_trained,
                                            "stop_streaming": True})

    async def _on_done(self) -> None:
        run = self.run
        if run is None:
            raise SessionError("replaced", "a newer connection of this device took over the run")
        run.end_stream()
        await run.wait_until(lambda: run.phase in ("finished", "failed"))
        if run.phase == "failed":
            raise SessionError("training_failed", run.error or "training failed")
        if run.phase != "finished":
            raise SessionError("shutting_down", "the server is stopping; reconnect later to resume")
        model = run.onnx_path.read_bytes()
        await self.ws.send(wire.encode_frame(wire.MsgType.MODEL, run.model_meta(), model))
        await self.ws.send(wire.encode_frame(wire.MsgType.DONE, {
            "samples_trained": run.samples_trained, "steps": run.step}))
        try:  # the device answers BYE and closes; either is fine
            await asyncio.wait_for(self.ws.recv(), self.server.config.hello_timeout_s)
        except (TimeoutError, websockets.ConnectionClosed):
            pass

    async def fail(self, error: SessionError) -> None:
        """ERROR frame, then close: 1001 (going away) when the server stops, 1008 (policy) otherwise."""
        if self.failed:
            return
        self.failed = True
        log.warning("session %s: %s", self.id, error)
        try:
            await self.ws.send(wire.error_frame(error.code, error.message))
            await self.ws.close(1001 if error.code == "shutting_down" else 1008, error.code[:100])
        except websockets.ConnectionClosed:
            pass


class TrainerServer:
    """The trainer as an object: `start()` binds and returns the port, `stop()` shuts down cleanly."""

    def __init__(self, config: ServerConfig):
        config.validate()
        self.config = config
        self.runs: dict[str, Run] = {}
        self.fed = FedCoordinator(self) if config.federated else None
        self._locks: dict[str, asyncio.Lock] = {}
        self._numbers = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._shutdown: asyncio.Event | None = None
        self._stopping = False
        self._ws_server = None
        self._sessions: set[Session] = set()
        self.port: int | None = None

    @property
    def url(self) -> str:
        scheme = "wss" if self.config.certfile else "ws"
        return f"{scheme}://{self.config.host}:{self.port}/"

    @property
    def stopping(self) -> bool:
        return self._stopping

    def start(self) -> int:
        """Bind and serve in a background thread; returns the bound port."""
        if self._thread is not None:
            raise RuntimeError("server already started")
        Path(self.config.runs_dir).mkdir(parents=True, exist_ok=True)
        if self.config.threads is not None:
            torch.set_num_threads(self.config.threads)  # process-wide, like torch itself
        # The first optimizer imports torch._dynamo (seconds): pay that before devices connect, so
        # the first HELLO after a (re)start is answered at once.
        make_optimizer(torch.nn.Linear(1, 1), self.config.optim)
        ready: concurrent.futures.Future = concurrent.futures.Future()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main(ready)), name="trainer-loop",
                                        daemon=True)
        self._thread.start()
        self.port = ready.result(timeout=30)
        log.info("trainer serving on %s (runs in %s, device %s)", self.url, self.config.runs_dir, self.config.device)
        return self.port

    def stop(self) -> None:
        """Graceful shutdown: stop accepting connections and batches, let every run finish the batches
        it already queued and checkpoint, tell connected devices (ERROR `shutting_down`, close 1001:
        reconnect later to resume), end the loop thread."""
        if self._thread is None or self._stopping:
            return
        self._stopping = True
        self._on_loop(self._stop_listening)
        for run in list(self.runs.values()):
            run.stop()
        if self.fed is not None:
            self.fed.stop()
        self._on_loop(self._goodbye)
        self._loop.call_soon_threadsafe(self._shutdown.set)
        self._thread.join(timeout=60)

    def _on_loop(self, coro_fn, timeout: float = 30.0) -> None:
        try:
            asyncio.run_coroutine_threadsafe(coro_fn(), self._loop).result(timeout)
        except (RuntimeError, concurrent.futures.TimeoutError) as exc:  # the loop already ended
            log.warning("shutdown step %s: %s", coro_fn.__name__, exc)

    async def _stop_listening(self) -> None:
        if self._ws_server is not None:
            self._ws_server.server.close()  # the listening socket only; open connections stay

    async def _goodbye(self) -> None:
        sessions = list(self._sessions)
        if sessions:
            error = SessionError("shutting_down", "the server is stopping; reconnect later to resume")
            await asyncio.wait([asyncio.ensure_future(s.fail(error)) for s in sessions], timeout=10)

    def __enter__(self) -> "TrainerServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def serve_forever(self) -> None:
        """Run until Ctrl-C / SIGTERM (the CLI's `trainer serve`)."""
        import signal

        stop = threading.Event()

        def on_sigterm(*_):
            log.info("SIGTERM: stopping (checkpointing every run, telling devices to reconnect later)")
            stop.set()

        signal.signal(signal.SIGTERM, on_sigterm)
        self.start()
        try:
            stop.wait()
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()

    async def _main(self, ready: concurrent.futures.Future) -> None:
        self._loop = asyncio.get_running_loop()
        self._shutdown = asyncio.Event()
        try:
            # No permessage-deflate: the payload is already quantized and deflate would cost CPU on both sides.
            async with serve(self._handle, self.config.host, self.config.port, max_size=self.config.max_frame,
                             compression=None, max_queue=4, ssl=self._ssl_context()) as ws_server:
                self._ws_server = ws_server
                ready.set_result(ws_server.sockets[0].getsockname()[1])
                await self._shutdown.wait()
        except Exception as exc:
            if not ready.done():
                ready.set_exception(exc)
            else:
                raise

    def _ssl_context(self):
        """TLS for wss:// when a certificate is configured (TLS 1.2 or newer), else None (ws://)."""
        if not self.config.certfile:
            return None
        import ssl

        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.config.certfile, self.config.keyfile)
        return ctx

    async def _handle(self, ws: ServerConnection) -> None:
        session = Session(self, ws, next(self._numbers))
        self._sessions.add(session)
        try:
            await session.serve()
        except SessionError as exc:
            await session.fail(exc)
        except websockets.ConnectionClosed as exc:
            log.info("session %s: connection closed (%s)", session.id, exc)
        except Exception as exc:  # a bug must end this session only
            log.exception("session %s: internal error", session.id)
            await session.fail(SessionError("server_error", f"{type(exc).__name__}: {exc}"))
        finally:
            session.detach()
            self._sessions.discard(session)

    def check_token(self, hello: Hello) -> None:
        """Constant-time compare (hmac.compare_digest): the time taken says nothing about the token."""
        want = self.config.token
        # surrogatepass: a JSON string may hold lone surrogates; they are just a wrong token.
        got = (hello.token or "").encode("utf-8", "surrogatepass")
        if want is not None and not hmac.compare_digest(got, want.encode()):
            raise SessionError("unauthorized", "missing or wrong token; ask the server's operator for it")

    async def attach(self, session: Session, hello: Hello) -> Run:
        """The run for this HELLO (created, resumed or taken over), drained so its counters are exact."""
        if self._stopping:
            raise SessionError("shutting_down", "the server is stopping; reconnect later to resume")
        lock = self._locks.setdefault(hello.run, asyncio.Lock())
        async with lock:
            run = self.runs.get(hello.run)
            if run is None:
                run = await asyncio.get_running_loop().run_in_executor(None, self._open_run, hello)
                if self._stopping:
                    run.stop()
                    raise SessionError("shutting_down", "the server is stopping; reconnect later to resume")
                self.runs[hello.run] = run
                run.start(asyncio.get_running_loop())
            else:
                _check_identity(run.cfg, hello)
            if run.phase == "failed":
                raise SessionError("training_failed", run.error or "training failed")
            old = run.session
            if old is not None:  # the same device again (identity matched): the new connection wins
                old.detach()
                asyncio.ensure_future(old.fail(SessionError("replaced", "a newer connection of this device took over")))
            # Resume point: everything already received gets trained first.
            await run.wait_until(lambda: run.phase != "stream" or run.stream_trained >= run.stream_accepted)
            if run.phase == "failed":
                raise SessionError("training_failed", run.error or "training failed")
            if run.stopped:
                raise SessionError("shutting_down", "the server is stopping; reconnect later to resume")
            run.stream_accepted = run.stream_trained
            run.session = session
            session.run = run
            session.credits = run.queue_size
            return run

    def _open_run(self, hello: Hello) -> Run:
        """A new run, or (with --resume) the one in runs/<run>/ (runs in an executor: it may read files)."""
        cfg = self.config
        folder = Path(cfg.runs_dir) / hello.run
        checkpoint = None
        if (folder / CHECKPOINT).is_file():
            if not cfg.resume:
                raise SessionError("run_exists", f"{folder} already holds a checkpoint; restart the server with "
                                                 f"--resume to continue it, or send another run name")
            run_cfg = RunConfig.load(folder)
            _check_identity(run_cfg, hello)
            checkpoint = load_checkpoint(folder)
        else:
            if cfg.cache and hello.formats() is None:
                raise SessionError("bad_hello", "this server caches taps (--cache), which needs one format per tap; "
                                                "send bits 'engine' or fixed formats instead of 'auto'")
            if cfg.side.pooling == "mean" and hello.mode == "pooled":
                raise SessionError("bad_hello", "pooled mode sends one token per sample, but this server pools "
                                                "with a masked mean over all tokens; use mode 'tokens'")
            run_cfg = RunConfig(
                run=hello.run, task=hello.task, task_type=hello.task_type, num_labels=hello.num_labels,
                model_id=hello.model_id, manifest_sha256=hello.manifest_sha256, device_id=hello.device_id,
                mode=hello.mode, epochs=hello.epochs, samples_per_epoch=hello.samples_per_epoch,
                taps=[t.as_dict() for t in hello.taps], cache=cfg.cache, bits=hello.bits,
                side=cfg.side.for_taps([t.hidden for t in hello.taps], hello.out_dim), optim=cfg.optim)
            folder.mkdir(parents=True, exist_ok=True)
            run_cfg.save(folder)
        return Run(run_cfg, folder, cfg.device, cfg.queue_size, cfg.checkpoint_every, cfg.bitplan_every, checkpoint)


def _check_identity(cfg: RunConfig, hello: Hello) -> None:
    saved = {"task": cfg.task, "task_type": cfg.task_type, "num_labels": cfg.num_labels, "model_id": cfg.model_id,
             "manifest_sha256": cfg.manifest_sha256, "mode": cfg.mode, "taps": cfg.taps, "epochs": cfg.epochs,
             "samples_per_epoch": cfg.samples_per_epoch, "device_id": cfg.device_id, "bits": cfg.bits}
    for key, value in hello.identity().items():
        if saved[key] != value:
            raise SessionError("run_mismatch", f"run {cfg.run!r} was started with {key}={saved[key]!r}, the HELLO "
                                               f"says {value!r}; send another run name to start a new run")
