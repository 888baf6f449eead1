"""The trainer server: WebSocket sessions in, side networks out.

One asyncio loop (its own thread) receives and validates frames and puts batches in each run's
bounded per-device queues; each run's training thread consumes them (`training.TrainingRun`), so
receiving and training overlap and the device never waits for a gradient. The message loop and
the WELCOME are here, for every run kind; which run a HELLO feeds, and with which strategy it is
opened, is the policy's (`policy.py`: one device per run, or federated). `docs/protocol.md` is the message contract.

    server = TrainerServer(ServerConfig(port=0, runs_dir="runs"))
    port = server.start()   # bound port; the server runs in a background thread
    ...
    server.stop()           # checkpoints unfinished runs
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import hmac
import itertools
import logging
import os
import threading
import time
from pathlib import Path

import torch
import websockets
from websockets.asyncio.server import ServerConnection, serve

from mobillm.common import messages, wire
from mobillm.common.messages import BitPlan, Credit, ErrorReport, Hello, ProtocolError, Welcome

from . import budget as mem
from .board import board_factory
from .config import ServerConfig, tls_context
from .core import make_optimizer
from .gate import AdmissionGate
from .policy import FederatedPolicy, Membership, RunPolicy, SingleDevicePolicy
from .protocol import Credits
from .status import StatusEndpoints

log = logging.getLogger("mobillm.trainer")

EXECUTOR_WORKERS = min(32, (os.cpu_count() or 1) + 4)  # file work at once (asyncio's default bound)


class Session:
    """One WebSocket connection: HELLO, WELCOME, then batches until DONE (or an error).

    It is the `core.Link` its run's training thread talks to (on this loop, via `deliver`)."""

    def __init__(self, server: "TrainerServer", ws: ServerConnection, number: int):
        self.server, self.ws, self.id = server, ws, f"s{number}"
        self.hello: Hello | None = None
        self.formats: list[str] | None = None  # per-tap BATCH formats the HELLO allows (None: any)
        self.credits = Credits()  # the run it joins opens them; BATCHes spend them, freed queue slots grant them
        self.failed = False
        self.allowance: mem.Allowance | None = None  # this device's memory share, once admitted
        self.address = ws.remote_address[0] if ws.remote_address else "?"
        self._sends: set[asyncio.Task] = set()
        self.connected_at = self.last_seen = time.time()  # for the status page
        self.bytes_in = 0

    # Called on the loop for the run's training thread.
    def grant_credit(self, seq: int, samples_done: int) -> None:
        """One queue slot freed: one more credit (none once streaming has stopped)."""
        self.post(Credit(self.credits.grant(), seq, samples_done))

    def post_bitplan(self, plan: BitPlan) -> None:
        self.post(plan)

    def stop_streaming(self, seq: int, samples_done: int) -> None:
        """Tell the device to send no more batches (the run trains on from its cache)."""
        self.credits.stop()
        self.post(Credit(0, seq, samples_done, stop_streaming=True))

    def post(self, message) -> None:
        """Send a typed message without waiting (the receive loop never blocks on a send)."""
        task = asyncio.ensure_future(self._send(messages.frame(message)))
        self._sends.add(task)
        task.add_done_callback(self._sends.discard)

    async def _send(self, data: bytes) -> None:
        try:
            await self.ws.send(data)
        except websockets.ConnectionClosed:
            pass

    # The session itself.
    async def serve(self) -> None:
        if self.ws.request is None or self.ws.request.path != "/":
            raise ProtocolError("bad_path", "connect to path '/'")
        try:
            first = await asyncio.wait_for(self.ws.recv(), self.server.config.hello_timeout_s)
        except TimeoutError:
            raise ProtocolError("timeout", f"no HELLO within {self.server.config.hello_timeout_s:g} s") from None
        frame = self._decode(first)
        self.server.authenticate(self, frame.meta)  # the token first: nothing else is checked before it
        if frame.type != wire.MsgType.HELLO:
            raise ProtocolError("expected_hello", f"the first frame must be HELLO, got {frame.type.name}")
        self.hello = Hello.from_meta(frame.meta)
        self.formats = self.hello.formats()
        if self.server.world is not None:  # several ranks: the device may belong to another one
            redirect = self.server.world.redirect_for(self.hello, self.server.config)
            if redirect is not None:
                await self.ws.send(messages.frame(Welcome(self.id, self.hello.run or "", 0, 0, False, False, 0,
                                                          redirect=redirect)))
                return
        self.allowance = self.server.admit(self)
        member = await self.server.policy.join(self, self.hello)
        self.ws.protocol.max_message_size = self.server.config.max_frame  # admitted: batches may come
        try:
            j = member.joined
            await self.ws.send(messages.frame(Welcome(self.id, j.run, self.credits.held, j.samples_done, j.cache,
                                                      j.stop_streaming, j.total_samples, j.federated)))
            log.info("session %s: device %s on run %s%s, resume at %d", self.id, self.hello.device_id, j.run,
                     f" (family {j.federated.family})" if j.federated else "", j.samples_done)
            while True:
                frame_bytes = await self._next_message()
                self.last_seen, self.bytes_in = time.time(), self.bytes_in + len(frame_bytes)
                frame = self._decode(frame_bytes)
                if frame.type == wire.MsgType.BATCH:
                    member.receive(frame, len(frame_bytes))
                elif frame.type == wire.MsgType.DONE:
                    await self._finish(member)
                    return
                elif frame.type == wire.MsgType.BYE:
                    return
                elif frame.type == wire.MsgType.ERROR:
                    log.warning("session %s: device reported %s", self.id, frame.meta)
                    return
                else:
                    raise ProtocolError("unexpected", f"{frame.type.name} is not a device-to-server message "
                                                      f"after HELLO")
        finally:
            member.leave()

    async def _next_message(self):
        """The next message; ERROR `timeout` when the device holds credits yet sends nothing for
        `--idle-timeout` (a device without credits is waiting for the server, which is fine)."""
        limit = self.server.config.idle_timeout_s
        while True:
            try:
                return await asyncio.wait_for(self.ws.recv(), limit)
            except TimeoutError:
                if self.credits.awaited:
                    raise ProtocolError("timeout", f"no BATCH or DONE for {limit:g} s while holding "
                                                   f"{self.credits.held} credits") from None

    def charge(self, batch: wire.Batch, nbytes: int):
        """Take a batch's memory (frame + decoded peak) from this device's share; the returned
        callable gives it back when the batch's training step ends. ERROR `over_budget` when it
        cannot fit."""
        config = self.server.config
        # Rows decoded for training: one a sample under last-token pooling, else every row sent
        # (a single-device summary run reads both its rows: policy.run_side_config).
        rows = int(batch.lengths.sum()) if config.side.pooling != "last" or batch.mode == "summary" \
            else len(batch.sample_ids)
        cost = mem.batch_cost(nbytes, rows, [t.hidden for t in batch.taps])
        if cost > config.batch_limit():
            raise ProtocolError(messages.OVER_BUDGET, f"this batch would hold {cost / mem.MIB:.1f} MiB while decoded "
                                                      f"for training, over the server's "
                                                      f"{config.batch_limit() / mem.MIB:.1f} MiB per batch; send "
                                                      f"fewer rows per batch")
        self.allowance.take(cost)
        return lambda: self.allowance.give(cost)

    def _decode(self, message) -> wire.Frame:
        try:
            return wire.decode_frame(message, self.server.config.max_frame)
        except wire.WireError as exc:
            raise ProtocolError("bad_frame", str(exc)) from None

    async def _finish(self, member: Membership) -> None:
        """DONE: the run trains what this device sent, then MODEL + DONE go back."""
        meta, model, done = await member.finish()
        await self.ws.send(wire.encode_frame(wire.MsgType.MODEL, meta, model))
        await self.ws.send(messages.frame(done))
        try:  # the device answers BYE and closes; either is fine
            await asyncio.wait_for(self.ws.recv(), self.server.config.hello_timeout_s)
        except (TimeoutError, websockets.ConnectionClosed):
            pass

    async def fail(self, error: ProtocolError) -> None:
        """ERROR frame, then close: 1001 (going away) when the server stops, 1008 (policy) otherwise."""
        if self.failed:
            return
        self.failed = True
        self.server.http.refused(error.code)
        log.warning("session %s: %s", self.id, error)
        # The WebSocket layer stops reading while an unread message waits (max_queue 1), so the peer's
        # close frame would wait behind it until close_timeout: discard what it sent meanwhile.
        drain = asyncio.ensure_future(self._discard_incoming())
        try:
            await self.ws.send(messages.frame(ErrorReport(error.code, error.message)))
            await self.ws.close(1001 if error.code == "shutting_down" else 1008, error.code[:100])
        except websockets.ConnectionClosed:
            pass
        finally:
            drain.cancel()

    async def _discard_incoming(self) -> None:
        try:
            async for _ in self.ws:
                pass
        except (websockets.ConnectionClosed, RuntimeError):  # closed, or another coroutine is receiving
            pass


class TrainerServer:
    """The trainer as an object: `start()` binds and returns the port, `stop()` shuts down cleanly."""

    def __init__(self, config: ServerConfig, world=None, coordinator=None):
        """`world` (`distributed.World`): this server is one rank of several; `coordinator`
        (`world_fed.Coordinator`): its federated runs train in lockstep with the other ranks."""
        config.validate()
        self.config, self.world = config, world
        policy = FederatedPolicy if config.federated else SingleDevicePolicy
        self.budget = mem.MemoryBudget(config.memory_budget or mem.default_budget())
        self.gate = AdmissionGate(config.max_unauthenticated, config.max_unauthenticated_per_address,
                                  config.auth_backoff_s, config.auth_ban_s)
        if coordinator is not None:
            policy = coordinator.policy
        self.policy: RunPolicy = policy(config, lambda: self.stopping, self.budget)
        self._numbers = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._shutdown: asyncio.Event | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._stopping = False
        self._ws_server = None
        self._sessions: set[Session] = set()
        self.port: int | None = None
        self.http = StatusEndpoints(self)  # GET /, /status.json, /metrics (status.py)
        self.policy.observers.extend(self.http.observers())
        make_board = board_factory() if config.tensorboard else None
        if make_board is not None:
            self.policy.observers.append(make_board)

    @property
    def open_sessions(self) -> int:
        return len(self._sessions)

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
        # Every run ends with an ONNX export checked by onnxruntime; their imports (~76 MiB, once per
        # process) are paid here, so idle RSS is that of a server ready to serve, and it is charged.
        warm_export()
        self._charge_base()
        ready: concurrent.futures.Future = concurrent.futures.Future()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main(ready)), name="trainer-loop",
                                        daemon=True)
        self._thread.start()
        self.port = ready.result(timeout=30)
        self.http.start()
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
        self.policy.stop()
        self._on_loop(self._goodbye)
        self._loop.call_soon_threadsafe(self._shutdown.set)
        self._thread.join(timeout=60)
        self.http.stop()

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
            error = ProtocolError("shutting_down", "the server is stopping; reconnect later to resume")
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
        self._renew_executor()
        self._shutdown = asyncio.Event()
        try:
            # No permessage-deflate: the payload is already quantized and deflate would cost CPU on both sides.
            # max_size: a HELLO's worth until the token is checked and the run admitted (Session.serve
            # raises it to --max-frame); max_queue 1: at most one unread message beside the one arriving.
            pre_auth = min(self.config.hello_max_bytes, self.config.max_frame)
            async with serve(self._handle, self.config.host, self.config.port, max_size=pre_auth, compression=None,
                             max_queue=1, ssl=self._ssl_context(), process_request=self._process_request) as ws_server:
                self._ws_server = ws_server
                ready.set_result(ws_server.sockets[0].getsockname()[1])
                reaper = asyncio.ensure_future(self._reap_idle_runs())
                await self._shutdown.wait()
                reaper.cancel()
        except Exception as exc:
            if not ready.done():
                ready.set_exception(exc)
            else:
                raise

    def _ssl_context(self):
        """TLS for wss:// when a certificate is configured, else None (ws://)."""
        return tls_context(self.config.certfile, self.config.keyfile) if self.config.certfile else None

    async def _handle(self, ws: ServerConnection) -> None:
        session = Session(self, ws, next(self._numbers))
        if not self.gate.opened(session.address):  # the caps filled up during the handshake
            await ws.close(1013, "too many unauthenticated connections; retry later")
            return
        self._sessions.add(session)
        try:
            await session.serve()
        except ProtocolError as exc:
            await session.fail(exc)
        except websockets.ConnectionClosed as exc:
            log.info("session %s: connection closed (%s)", session.id, exc)
        except Exception as exc:  # a bug must end this session only
            log.exception("session %s: internal error", session.id)
            await session.fail(ProtocolError("server_error", f"{type(exc).__name__}: {exc}"))
        finally:
            self._sessions.discard(session)
            if session.allowance is None:
                self.gate.settled(session.address)  # it never got past admission
            else:
                session.allowance.close()

    def check_token(self, token) -> None:
        """ERROR `unauthorized` unless `token` is the server's (any token when it has none)."""
        if not self.token_ok(token):
            raise ProtocolError("unauthorized", "missing or wrong token; ask the server's operator for it")

    def token_ok(self, token) -> bool:
        """Constant-time compare (hmac.compare_digest): the time taken says nothing about the token."""
        want = self.config.token
        if want is None:
            return True
        # surrogatepass: a JSON string may hold lone surrogates; they are just a wrong token.
        got = (token if isinstance(token, str) else "").encode("utf-8", "surrogatepass")
        return hmac.compare_digest(got, want.encode())

    # ---- hostile clients: admission, authentication, memory (trainer/gate.py, trainer/budget.py) ----

    def _process_request(self, connection: ServerConnection, request):
        """websockets' process_request: the admission gate first (HTTP 429/503 before anything is
        buffered), then the status page, /status.json and /metrics (trainer/status.py)."""
        return self._admit_connection(connection, request) or self.http.process_request(connection, request)

    def _admit_connection(self, connection: ServerConnection, request):
        """process_request: refuse (HTTP 429/503) a connection the gate would not let in, before the
        WebSocket handshake completes and before anything of it is buffered."""
        address = connection.remote_address[0] if connection.remote_address else "?"
        refusal = self.gate.refusal(address)
        if refusal is not None:
            return connection.respond(*refusal)
        return None

    def authenticate(self, session: Session, meta) -> None:
        """The first frame's token, before any other check of it; a wrong one backs its address off."""
        try:
            self.check_token(meta.get("token") if isinstance(meta, dict) else None)
        except ProtocolError:
            self.gate.failed(session.address)
            raise
        self.gate.succeeded(session.address)

    def admit(self, session: Session) -> mem.Allowance:
        """Reserve the session's memory share (ERROR over_budget when the server is full); from now on it
        no longer counts as unauthenticated."""
        reservation = self.budget.reserve(self.config.session_memory, f"device {session.hello.device_id}'s session")
        self.gate.settled(session.address)
        return mem.Allowance(reservation, self.config.session_memory - 2 * self.config.max_frame)

    def _charge_base(self) -> None:
        """The process's own memory (torch, the loop) is charged once, at start."""
        from mobillm.common.procfs import rss_mb

        self.budget.used = self.budget.base = int(rss_mb() * mem.MIB)
        if self.budget.free < self.config.session_memory:
            log.warning("--memory-budget %d MiB leaves %d MiB after the process's own %d MiB: not even one "
                        "session fits", self.budget.total >> 20, self.budget.free >> 20, self.budget.base >> 20)

    def _renew_executor(self) -> None:
        """A fresh executor for the loop's file work (opening, releasing, exporting runs), bounded like
        asyncio's default. A pool's threads start on demand and never exit by themselves, so after idle
        runs are released the reaper swaps pools: the old one's workers exit after their current job."""
        old, self._executor = self._executor, concurrent.futures.ThreadPoolExecutor(
            EXECUTOR_WORKERS, thread_name_prefix="trainer-io")
        self._loop.set_default_executor(self._executor)
        if old is not None:
            old.shutdown(wait=False)

    async def _reap_idle_runs(self) -> None:
        """Every few seconds: checkpoint and release the runs idle for --idle-timeout."""
        period = min(max(self.config.idle_timeout_s / 4, 0.05), 5.0)
        while True:
            await asyncio.sleep(period)
            try:
                if await self.policy.release_idle(self.config.idle_timeout_s):
                    self._renew_executor()
            except Exception:  # a failure to release must not stop the server
                log.exception("releasing idle runs")


@functools.cache
def warm_export() -> None:
    """Export a 4-wide side network and check it with onnxruntime, once per process: this imports
    torch.onnx and onnxruntime and opens ONNX Runtime's one-time files, as every run's export does."""
    from .config import SideConfig
    from .export import check_onnx, export_onnx
    from .model import build_side_network

    model = build_side_network(SideConfig().for_taps([4], 2), 0)
    check_onnx(export_onnx(model), model)
