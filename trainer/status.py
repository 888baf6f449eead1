"""Plain HTTP on the trainer's WebSocket port: the live status page, its JSON, and Prometheus /metrics.

websockets hands every request to `process_request` before the upgrade: a request that asks for
a WebSocket goes on to the device protocol (`server.Session`); any other GET is answered here.

  GET /             status.html: one static page, no build step, no CDN; its inline script polls
                    status.json every second (runs, their progress and loss curve; connected devices)
  GET /status.json  `snapshot(server)`: counts, names and numbers only, never activations, labels,
                    device addresses or the token
  GET /metrics      Prometheus text format (`metrics.py`)

Read-only. With a server token every route asks for it (401 without) as `Authorization: Bearer
TOKEN` or `?token=TOKEN` (what a browser can send; the page passes it on to status.json and never
writes it into the document). Any other path: 404.
"""

from __future__ import annotations

import http
import json
import logging
import math
import time
from collections import deque
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from .board import read_summary
from .metrics import run_state, server_metrics

log = logging.getLogger("mobillm.trainer")

CURVE_POINTS = 240  # loss points kept per run for the page's curve
RATE_WINDOW = 32  # recent steps that samples/s is measured over


class RunTrace:
    """A run observer: the recent steps the page shows (loss curve, throughput, latest values)."""

    def __init__(self):
        self.curve: deque = deque(maxlen=CURVE_POINTS)  # [step, loss]
        self.recent: deque = deque(maxlen=RATE_WINDOW)  # (time, samples trained)
        self.last: dict = {}

    def step(self, run, record: dict) -> None:
        self.curve.append((record["step"], record["loss"]))
        self.recent.append((record["time"], record["samples"]))
        self.last = record

    def end(self, run) -> None:
        pass

    def samples_per_s(self) -> float | None:
        recent = list(self.recent)
        if len(recent) < 2 or recent[-1][0] <= recent[0][0]:
            return None
        return (recent[-1][1] - recent[0][1]) / (recent[-1][0] - recent[0][0])


KEEP_GONE = 64  # traces kept of runs the server no longer holds


class StatusEndpoints:
    """The HTTP side of one `TrainerServer`: routes, the run traces behind them, and its metrics."""

    def __init__(self, server):
        self.server = server
        self.metrics = server_metrics(server)
        self.traces: dict[str, RunTrace] = {}
        self.started = time.time()
        self.metrics_port: int | None = None
        self._page = Path(__file__).with_name("status.html").read_bytes()

    def observers(self) -> list:
        """Factories of run observers (`policy.RunTable.observers`)."""
        return [self._trace] + ([self.metrics.observer] if self.metrics else [])

    def _trace(self, run) -> RunTrace:
        self._prune()
        trace = self.traces[run.name] = RunTrace()
        return trace

    def _prune(self) -> None:
        """Keep the traces (and step-time series) of the runs the server holds, plus the last
        KEEP_GONE of those it let go (finished or released idle runs), so that a stream of new run
        names cannot grow them without bound."""
        held = set(getattr(self.server.policy, "runs", {}))
        gone = [name for name in self.traces if name not in held]  # oldest first (insertion order)
        for name in gone[:max(len(gone) - KEEP_GONE, 0)]:
            del self.traces[name]
            if self.metrics is not None:
                self.metrics.forget(name)

    def refused(self, reason: str) -> None:
        """A connection was ended by the server with ERROR `reason`."""
        if self.metrics is not None:
            self.metrics.refused.labels(reason).inc()

    def start(self) -> None:
        quiet_served_pages()
        port = self.server.config.metrics_port
        if port is not None and self.metrics is not None:
            self.metrics_port = self.metrics.serve_port(self.server.config.host, port)
            log.info("Prometheus metrics on http://%s:%d/metrics", self.server.config.host, self.metrics_port)

    def stop(self) -> None:
        if self.metrics is not None:
            self.metrics.stop()

    # ---- HTTP ----

    def process_request(self, connection, request: Request) -> Response | None:
        """websockets' hook: None lets a WebSocket upgrade through; any other GET gets its answer here."""
        if "websocket" in request.headers.get("Upgrade", "").lower():
            return None
        url = urlsplit(request.path)
        routes = {"/": self._html, "/status.json": self._json, "/metrics": self._metrics}
        route = routes.get(url.path)
        if route is None:
            return text_response(http.HTTPStatus.NOT_FOUND, "not found: try / (status page), /status.json or "
                                                            "/metrics\n")
        if not self.authorized(request, url.query):
            response = text_response(http.HTTPStatus.UNAUTHORIZED, "this server needs its token: "
                                     "Authorization: Bearer TOKEN, or ?token=TOKEN\n")
            response.headers["WWW-Authenticate"] = 'Bearer realm="mobillm trainer"'
            return response
        return route()

    def authorized(self, request: Request, query: str) -> bool:
        header = request.headers.get("Authorization", "")
        got = header[len("Bearer "):] if header.startswith("Bearer ") else parse_qs(query).get("token", [""])[0]
        return self.server.token_ok(got)  # constant time, the same check as the HELLO's

    def _html(self) -> Response:
        return response(http.HTTPStatus.OK, self._page, "text/html; charset=utf-8")

    def _json(self) -> Response:
        body = json.dumps(snapshot(self.server, self.traces, self.started), allow_nan=False).encode()
        return response(http.HTTPStatus.OK, body, "application/json")

    def _metrics(self) -> Response:
        if self.metrics is None:
            return text_response(http.HTTPStatus.SERVICE_UNAVAILABLE, "prometheus_client is not installed on the "
                                 "server: pip install 'mobillm[observability]'\n")
        return response(http.HTTPStatus.OK, *self.metrics.exposition())


class ServedPageFilter(logging.Filter):
    """Drops websockets' INFO line for each answered GET below 400: a page polling every second and a
    scraper would otherwise fill the log. Refusals (401, 404) are still logged."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.msg == "HTTP response sent (%d %s)" and record.args and record.args[0] < 400)


def quiet_served_pages() -> None:
    ws_log = logging.getLogger("websockets.server")
    if not any(isinstance(f, ServedPageFilter) for f in ws_log.filters):
        ws_log.addFilter(ServedPageFilter())


def response(status: http.HTTPStatus, body: bytes, content_type: str) -> Response:
    headers = Headers([("Content-Type", content_type), ("Content-Length", str(len(body))),
                       ("Cache-Control", "no-store"), ("X-Content-Type-Options", "nosniff"), ("Connection", "close")])
    return Response(status.value, status.phrase, headers, body)


def text_response(status: http.HTTPStatus, text: str) -> Response:
    return response(status, text.encode(), "text/plain; charset=utf-8")


# ---- what the page shows ----

def finite(value):
    """JSON-safe number: NaN and infinities become None."""
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


def snapshot(server, traces: dict[str, RunTrace], started: float) -> dict:
    """status.json: the server, its runs and the devices feeding them, as of now."""
    now = time.time()
    runs, devices = [], []
    for name, run in list(getattr(server.policy, "runs", {}).items()):
        with run.cond:
            members = list(run.members.values())
            queued = sum(len(m.queue) for m in members)
        runs.append(run_entry(name, run, traces.get(name), members, queued))
        federated = getattr(run.strategy, "cfg", None) is None
        scores = read_summary(run.folder).get("devices", {}) if federated else {}
        for m in members:
            if m.session is not None:
                devices.append(device_entry(name, m, now, scores.get(m.device_id, {})))
    return {"time": now, "uptime_s": now - started, "federated": server.config.federated,
            "connections": server.open_sessions, "runs": runs, "devices": devices}


def run_entry(name: str, run, trace: RunTrace | None, members: list, queued: int) -> dict:
    cfg = getattr(run.strategy, "cfg", None)  # single device: its RunConfig; federated: none
    if cfg is not None:
        task, total, epochs = cfg.task, cfg.total_samples, cfg.epochs
        metric = {k: finite(v) for k, v in run.strategy.summary.items() if k.startswith("last_epoch_")}
    else:
        task, total, epochs, metric = run.strategy.task["task"], None, None, {}
    last = trace.last if trace is not None else {}
    return {"name": name, "task": task, "kind": "single" if cfg is not None else "federated", "phase": run.phase,
            "state": run_state(run), "devices": sorted(m.device_id for m in members if m.session is not None),
            "step": run.step, "samples_trained": run.samples_trained, "total_samples": total, "epochs": epochs,
            "epoch": finite(last.get("epoch")), "progress": run.samples_trained / total if total else None,
            "samples_per_s": finite(trace.samples_per_s()) if trace is not None else None,
            "loss": finite(last.get("loss")), "lr": finite(last.get("lr")), "metric": metric,
            "queue_depth": queued, "bytes_received": run.bytes_received,
            "loss_curve": [[s, finite(v)] for s, v in list(trace.curve)] if trace is not None else []}


def device_entry(run: str, member, now: float, scores: dict) -> dict:
    session = member.session
    connected = getattr(session, "connected_at", now)
    bytes_in = getattr(session, "bytes_in", 0)
    return {"device_id": member.device_id, "run": run, "samples_trained": member.trained,
            "progress": member.trained / member.limit if member.limit else None,
            "last_seen_s": now - getattr(session, "last_seen", connected), "connected_s": now - connected,
            "bytes_in": bytes_in, "bytes_per_s": bytes_in / max(now - connected, 1e-9),
            "metric": {k: finite(v) for k, v in scores.items() if k.startswith("last_epoch_")}}
