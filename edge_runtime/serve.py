"""`edge-run serve`: the fine-tuned model behind a local HTTP JSON endpoint, loaded once.

    POST /predict  {"text": "..."} -> one prediction; {"texts": ["...", ...]} -> {"predictions": [...]}
                   (a text of a pair task is a list of its segments: ["sentence 1", "sentence 2"])
    GET  /health   {"status": "ok", model, task, labels, ...}

Standard library only (http.server, one thread per connection). Requests are batched dynamically:
one batcher thread runs whatever is queued as one forward pass (up to `max_batch` texts); while
other requests are still being read it waits up to `batch_wait_ms` for them, and a lone request
never waits. Bad input is HTTP 400 (413 for a body or text over the limit) with one line, and
the service keeps serving. One log line per request.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

import numpy as np

from mobillm.common.options import option
from mobillm.common.tasks import Task

from .predict import readable

log = logging.getLogger("mobillm.serve")


@dataclass(frozen=True)
class ServeOptions:
    """Where `edge-run serve` listens and what it accepts (its flags)."""

    host: str = option("127.0.0.1", "address to bind; 127.0.0.1 answers this machine only, 0.0.0.0 every network")
    port: int = option(8080, "TCP port (0: any free port, printed at start)")
    max_batch: int = option(16, "most texts in one forward pass")
    batch_wait_ms: float = option(2.0, "how long a batch waits for requests still being read (a lone request "
                                       "never waits)")
    max_body: int = option(1 << 20, "largest request body in bytes (larger: HTTP 413)")
    max_texts: int = option(256, "most texts in one request")
    max_chars: int = option(20_000, "longest text in characters (longer: HTTP 413)")


class RequestError(ValueError):
    """A request the service refuses: HTTP `status` and one line."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class _Job:
    rows: list[np.ndarray]
    done: threading.Event = field(default_factory=threading.Event)
    logits: np.ndarray | None = None
    error: BaseException | None = None
    batch: int = 0


class Batcher:
    """One thread that runs queued requests together: `submit` blocks until its rows' logits are back."""

    def __init__(self, logits: Callable[[list[np.ndarray]], np.ndarray], max_batch: int, wait_ms: float):
        self._logits, self.max_batch, self.wait_s = logits, max_batch, wait_ms / 1000
        self._queue: queue.Queue = queue.Queue()
        self._arriving = 0  # requests being read: worth a short wait for
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="batcher", daemon=True)
        self._thread.start()

    def arriving(self, delta: int) -> None:
        with self._lock:
            self._arriving += delta

    def submit(self, rows: list[np.ndarray]) -> _Job:
        job = _Job(rows)
        self._queue.put(job)
        job.done.wait()
        return job

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            jobs, size = [job], len(job.rows)
            deadline = time.perf_counter() + self.wait_s
            while size < self.max_batch:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    with self._lock:
                        waiting = self._arriving > 0
                    if not waiting or time.perf_counter() >= deadline:
                        break
                    time.sleep(0.0002)
                    continue
                if nxt is None:
                    self._queue.put(None)  # stop after this batch
                    break
                jobs.append(nxt)
                size += len(nxt.rows)
            self._run(jobs, size)

    def _run(self, jobs: list[_Job], size: int) -> None:
        rows = [r for j in jobs for r in j.rows]
        try:
            # Longest first, chunks of max_batch: a request larger than max_batch is split, never refused.
            order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
            parts = []
            for start in range(0, len(order), self.max_batch):
                idx = order[start:start + self.max_batch]
                parts.append((idx, self._logits([rows[i] for i in idx])))
            out = np.zeros((len(rows), parts[0][1].shape[-1]), np.float32)
            for idx, part in parts:
                out[idx] = part
            at = 0
            for j in jobs:
                j.logits, j.batch = out[at:at + len(j.rows)], size
                at += len(j.rows)
        except Exception as exc:  # one bad batch fails its requests, not the service
            for j in jobs:
                j.error = exc
        for j in jobs:
            j.done.set()


class PredictionService:
    """The model (a tokenizer and a logits function) behind the HTTP endpoint."""

    def __init__(self, tokenize: Callable[[tuple[str, ...]], np.ndarray],
                 logits: Callable[[list[np.ndarray]], np.ndarray], task: Task, labels: tuple[str, ...],
                 describe: dict, opts: ServeOptions):
        self.tokenize, self.task, self.labels, self.describe, self.opts = tokenize, task, labels, describe, opts
        self.batcher = Batcher(logits, opts.max_batch, opts.batch_wait_ms)
        self.served = 0
        self.httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def parse(self, body: bytes) -> tuple[list[tuple[str, ...]], bool]:
        """The texts of a request body (each a tuple of segments) and whether it asked for one text."""
        try:
            req = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RequestError(400, f"body is not valid JSON ({getattr(exc, 'msg', exc)})") from None
        if not isinstance(req, dict) or ("text" in req) == ("texts" in req):
            raise RequestError(400, 'give a JSON object with "text": "..." or "texts": ["...", ...]')
        single = "text" in req
        items = [req["text"]] if single else req["texts"]
        if not isinstance(items, list) or not items:
            raise RequestError(400, '"texts" must be a non-empty list of strings')
        if len(items) > self.opts.max_texts:
            raise RequestError(413, f"{len(items)} texts in one request; at most {self.opts.max_texts}")
        texts = []
        segments = len(self.task.text_cols)
        for i, item in enumerate(items):
            parts = (item,) if isinstance(item, str) else tuple(item) if isinstance(item, list) else None
            if not parts or not all(isinstance(p, str) for p in parts):
                raise RequestError(400, f"text {i} must be a string (or a list of {segments} strings for a pair task)")
            if len(parts) != segments:
                raise RequestError(400, f"text {i} has {len(parts)} segment(s); task {self.task.name} reads {segments}")
            if sum(len(p) for p in parts) > self.opts.max_chars:
                raise RequestError(413, f"text {i} is over {self.opts.max_chars} characters")
            texts.append(parts)
        return texts, single

    def predict(self, texts: list[tuple[str, ...]]) -> tuple[list[dict], int]:
        job = self.batcher.submit([self.tokenize(t) for t in texts])
        if job.error is not None or job.logits is None:
            raise job.error or RuntimeError("no logits came back")
        return readable([" | ".join(t) for t in texts], job.logits, self.task, self.labels), job.batch

    def start(self) -> int:
        """Bind and serve in a background thread; returns the port."""
        self.httpd = _Server((self.opts.host, self.opts.port), _handler(self))
        self.httpd.daemon_threads = True
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="http", daemon=True)
        self._thread.start()
        return self.httpd.server_address[1]

    def stop(self) -> None:
        if self.httpd is not None and self._thread is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
            self._thread.join(timeout=10)
        self.batcher.stop()


class _Server(ThreadingHTTPServer):
    request_queue_size = 512  # listen backlog: a burst of connections waits instead of being reset (default 5)


def _handler(service: PredictionService):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: a client reuses its connection
        # Headers and body go out as two writes: with Nagle's algorithm the second waits for the
        # client's delayed ACK (~40 ms on Linux) on every response.
        disable_nagle_algorithm = True

        def log_message(self, format, *args):  # one line per request comes from _reply instead
            pass

        def _reply(self, status: int, payload: dict, started: float, note: str = "") -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            log.info("%s %s %s %d %.1fms%s", self.client_address[0], self.command, self.path, status,
                     (time.perf_counter() - started) * 1000, note)

        def do_GET(self):
            started = time.perf_counter()
            if self.path != "/health":
                self._reply(404, {"error": f"no route {self.path}; use POST /predict or GET /health"}, started)
                return
            self._reply(200, {"status": "ok", **service.describe, "task": service.task.name,
                              "labels": list(service.labels), "max_batch": service.opts.max_batch,
                              "served": service.served}, started)

        def do_POST(self):
            started = time.perf_counter()
            if self.path != "/predict":
                self._drain()
                self._reply(404, {"error": f"no route {self.path}; use POST /predict or GET /health"}, started)
                return
            service.batcher.arriving(1)
            arriving = True
            try:
                texts, single = service.parse(self._body())
                service.batcher.arriving(-1)
                arriving = False
                records, batch = service.predict(texts)
            except RequestError as exc:
                self._reply(exc.status, {"error": str(exc)}, started, f" refused: {exc}")
                return
            except Exception as exc:  # the model failed on this batch: say so, keep serving
                line = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
                self._reply(500, {"error": f"prediction failed: {line}"}, started, f" failed: {line}")
                return
            finally:
                if arriving:
                    service.batcher.arriving(-1)
            service.served += len(texts)
            payload = records[0] if single else {"predictions": records}
            self._reply(200, payload, started, f" texts={len(texts)} batch={batch}")

        def _body(self) -> bytes:
            try:
                length = int(self.headers.get("Content-Length", ""))
            except ValueError:
                self.close_connection = True
                raise RequestError(400, "a POST /predict needs a Content-Length header") from None
            if length > service.opts.max_body:
                self.close_connection = True  # the unread body would be taken for the next request
                raise RequestError(413, f"body of {length} bytes is over the {service.opts.max_body}-byte limit")
            return self.rfile.read(length)

        def _drain(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if 0 < length <= service.opts.max_body:
                self.rfile.read(length)
            elif length:
                self.close_connection = True

    return Handler
