"""Prometheus metrics of one trainer server, in its own registry (several servers can share a process).

Most values are read from the server's runs and sessions when scraped (`LiveCollector`), so the
message loop and the training threads do no extra work for them; only the step-time histogram
(one `observe` per optimizer step) and the refused-connection counter are updated as things happen.
Served as `GET /metrics` on the WebSocket port (`status.py`) or on `--metrics-port`.
Needs `prometheus_client` (`pip install 'mobillm[observability]'`); `server_metrics` returns None without it.
"""

from __future__ import annotations

import logging

log = logging.getLogger("mobillm.trainer")

PREFIX = "mobillm_trainer"
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def server_metrics(server):
    """`ServerMetrics` for `server`, or None (after one notice in the log) when prometheus_client is missing."""
    try:
        import prometheus_client  # noqa: F401
    except ImportError as exc:
        log.warning("GET /metrics off: %s (pip install 'mobillm[observability]')", exc)
        return None
    return ServerMetrics(server)


def run_state(run) -> str:
    """active (a device is connected), idle (waiting for one), finished or failed."""
    if run.phase in ("finished", "failed"):
        return run.phase
    return "active" if any(m.session is not None for m in list(run.members.values())) else "idle"


class ServerMetrics:
    """The registry, the instruments updated as things happen, and the exposition."""

    def __init__(self, server):
        from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector

        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)  # process_resident_memory_bytes, cpu seconds, open fds
        self.refused = Counter(f"{PREFIX}_refused_connections", "connections ended by the server, by reason "
                               "(the ERROR code sent: unauthorized, bad_frame, run_exists, ...)", ["reason"],
                               registry=self.registry)
        self.step_seconds = Histogram(f"{PREFIX}_step_seconds", "time of one optimizer step (decode, forward, "
                                      "backward, AdamW)", ["run"], buckets=STEP_BUCKETS, registry=self.registry)
        self.registry.register(LiveCollector(server))
        self._http = None

    def observer(self, run) -> "StepTimer":
        return StepTimer(self.step_seconds.labels(run.name))

    def forget(self, run_name: str) -> None:
        """Drop a run's step-time series (a run no longer held by the server)."""
        try:
            self.step_seconds.remove(run_name)
        except KeyError:
            pass

    def exposition(self) -> tuple[bytes, str]:
        """(body, content type) of the text exposition format."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def serve_port(self, host: str, port: int) -> int:
        """Serve this registry alone on its own port (`--metrics-port`); returns the bound port."""
        from prometheus_client import start_http_server

        self._http, _thread = start_http_server(port, addr=host, registry=self.registry)
        return self._http.server_address[1]

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class StepTimer:
    """A run observer: each step's `step_s` goes into the histogram."""

    def __init__(self, child):
        self.child = child

    def step(self, run, record: dict) -> None:
        self.child.observe(record["step_s"])

    def end(self, run) -> None:
        pass


class LiveCollector:
    """Gauges and counters read from the server's state at scrape time."""

    def __init__(self, server):
        self.server = server

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        runs = dict(getattr(self.server.policy, "runs", {}))
        devices = GaugeMetricFamily(f"{PREFIX}_devices_connected", "devices feeding a run now")
        sessions = GaugeMetricFamily(f"{PREFIX}_connections_open", "open WebSocket connections (with those "
                                     "that have not sent HELLO yet)")
        states = GaugeMetricFamily(f"{PREFIX}_runs", "runs by state: active (a device connected), idle, "
                                   "finished, failed", labels=["state"])
        queue = GaugeMetricFamily(f"{PREFIX}_queue_depth", "batches received and waiting to train", labels=["run"])
        received = CounterMetricFamily(f"{PREFIX}_samples_received", "samples received from devices (queued or "
                                       "trained; a resumed run counts from its resume point)", labels=["run"])
        trained = CounterMetricFamily(f"{PREFIX}_samples_trained", "samples trained (all epochs)", labels=["run"])
        bytes_in = CounterMetricFamily(f"{PREFIX}_bytes_received", "BATCH bytes received since the server "
                                       "started", labels=["run"])
        steps = CounterMetricFamily(f"{PREFIX}_steps", "optimizer steps", labels=["run"])
        counts = {"active": 0, "idle": 0, "finished": 0, "failed": 0}
        connected = 0
        for name, run in runs.items():
            with run.cond:
                members = list(run.members.values())
                depth = sum(len(m.queue) for m in members)
                accepted = sum(m.accepted for m in members)
            connected += sum(m.session is not None for m in members)
            counts[run_state(run)] += 1
            queue.add_metric([name], depth)
            received.add_metric([name], accepted)
            trained.add_metric([name], run.samples_trained)
            bytes_in.add_metric([name], run.bytes_received)
            steps.add_metric([name], run.step)
        devices.add_metric([], connected)
        sessions.add_metric([], self.server.open_sessions)
        for state, n in counts.items():
            states.add_metric([state], n)
        yield from (devices, sessions, states, queue, received, trained, bytes_in, steps)
