"""Reliability harness: a fault-injecting link, `trainer serve` as a real subprocess, and checks.

Counts scale with MOBILLM_RELIABILITY_SCALE: `small` (default, CI: the whole folder in a few
minutes on 2 cores) or `full` (what `bench/ci/reliability.py` runs). With MOBILLM_RELIABILITY_REPORT
set to a file, every test appends what it measured there as one JSON line.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from helpers import started_each, write_rows

from mobillm.bench.server import TrainerServe
from mobillm.common.netsim import Connection, LinkProxy, free_port
from mobillm.common.procfs import status_mb

PROFILES = {
    # link: drops to inject; crash: kill -9s in one run; devices/frames: load; fuzz: hypothesis examples
    "small": {"link_rows": 160, "link_epochs": 2, "link_drops": 12, "crash_rows": 96, "crash_kills": 1,
              "load_devices": 32, "load_samples": 48, "load_hidden": 256, "load_taps": 2, "load_len": (4, 12),
              "fuzz_examples": 300, "live_fuzz_sessions": 40},
    "full": {"link_rows": 400, "link_epochs": 4, "link_drops": 100, "crash_rows": 160, "crash_kills": 3,
             "load_devices": 32, "load_samples": 64, "load_hidden": 2048, "load_taps": 4, "load_len": (16, 48),
             "fuzz_examples": 2000, "live_fuzz_sessions": 200},
}
SCALE = os.environ.get("MOBILLM_RELIABILITY_SCALE", "small")
if SCALE not in PROFILES:
    raise pytest.UsageError(f"MOBILLM_RELIABILITY_SCALE must be one of {sorted(PROFILES)}, got {SCALE!r}")


@pytest.fixture(scope="session")
def profile() -> dict:
    return dict(PROFILES[SCALE], name=SCALE)


@pytest.fixture
def report(request):
    """report(**measured): one JSON line per test in $MOBILLM_RELIABILITY_REPORT (bench/ci/reliability.py)."""
    def write(**values):
        line = json.dumps({"test": request.node.name, "scale": SCALE, **values})
        print(line)
        path = os.environ.get("MOBILLM_RELIABILITY_REPORT")
        if path:
            with open(path, "a") as f:
                f.write(line + "\n")
    return write


# ---- the link ------------------------------------------------------------------------------------

class FaultProxy(LinkProxy):
    """127.0.0.1:port -> 127.0.0.1:target, cutting connections at random byte offsets.

    Each new connection draws where it dies: during the WebSocket handshake (1 in 10), in the
    downlink (CREDIT/WELCOME/MODEL bytes, 2 in 10) or in the uplink (BATCH bytes, the rest), at a
    uniform byte offset, so most cuts land inside a frame. The bytes before the cut are delivered,
    then the connection is closed (FIN) or reset (RST), at random. After `drops` cuts the link is
    clean. `rate` limits the uplink (bytes/s) to stretch a run; `capture` keeps every uplink byte.
    """

    def __init__(self, target_port: int, drops: int = 0, mean_up: int = 16384, mean_down: int = 2048,
                 rate: float | None = None, capture: bool = False, seed: int = 0):
        super().__init__(target_port, rate, capture=capture)
        self.drops_left = drops
        self.mean_up, self.mean_down = mean_up, mean_down
        self.rng = np.random.default_rng(seed)
        self.drops: Counter = Counter()  # where the cuts landed: handshake / up / down

    @property
    def total_drops(self) -> int:
        return sum(self.drops.values())

    def opened(self, conn: Connection) -> None:
        conn.plan = self._plan()

    def _plan(self) -> tuple[str | None, int]:
        if self.drops_left <= 0:
            return None, 0
        r = self.rng.random()
        if r < 0.1:
            return "handshake", int(self.rng.integers(1, 300))
        if r < 0.3:
            return "down", int(self.rng.integers(1, 2 * self.mean_down))
        return "up", int(self.rng.integers(1, 2 * self.mean_up))

    def forward(self, conn: Connection, data: bytes, up: bool) -> tuple[bytes, bool]:
        kind, offset = conn.plan
        sent = conn.sent_up if up else conn.sent_down
        cut = (kind == ("up" if up else "down") or (up and kind == "handshake")) and sent + len(data) >= offset
        return (data[:offset - sent], True) if cut else (data, False)

    def close(self, conn: Connection) -> None:
        if conn.closed or self.drops_left <= 0:
            return
        conn.closed = True
        self.drops_left -= 1
        self.drops[conn.plan[0]] += 1
        reset = self.rng.random() < 0.5
        for w in conn.writers:
            w.transport.abort() if reset else w.close()


@pytest.fixture
def fault_proxy():
    """fault_proxy(target_port, **FaultProxy options) -> a started FaultProxy; stopped at teardown."""
    yield from started_each(FaultProxy)


# ---- the server as a process ------------------------------------------------------------------

class ServerProcess(TrainerServe):
    """`trainer serve` in a child process on a fixed port (so a restart is found at the same address),
    ready when its log says so (a restart's old socket cannot answer for it)."""

    def __init__(self, runs: Path, port: int, args: list[str], log: Path):
        super().__init__(runs, "--threads", "1", *args, port=port, log=log,
                         env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"))

    def launch(self, *extra: str) -> ServerProcess:
        """Start the process without waiting (see wait_ready)."""
        self._mark = self.log_text().count("trainer serving on")
        self._t0 = time.perf_counter()
        super().launch(*extra)
        return self

    def wait_ready(self, timeout: float = 60.0) -> float:
        """Wait until the launched server listens; returns the seconds since launch."""
        while self.log_text().count("trainer serving on") <= self._mark:
            if self.proc.poll() is not None:
                raise RuntimeError(f"trainer serve exited with {self.proc.returncode}:\n{self.log_text()[-3000:]}")
            if time.perf_counter() - self._t0 > timeout:
                raise TimeoutError(f"trainer serve did not listen within {timeout:g} s:\n{self.log_text()[-3000:]}")
            time.sleep(0.02)
        return time.perf_counter() - self._t0

    def start(self, *extra: str, timeout: float = 60.0) -> float:
        """Start and wait until it listens; returns the seconds that took."""
        return super().start(*extra, timeout=timeout)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.is_file() else ""

    def kill9(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM; returns the exit status."""
        os.kill(self.proc.pid, signal.SIGTERM)
        return self.proc.wait(timeout)

    def rss_mb(self, field: str = "VmRSS") -> float:
        """Resident memory (VmRSS) or its peak so far (VmHWM) from /proc, in MiB."""
        return status_mb(field, self.proc.pid)

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)  # by PID, never by name
            self.proc.wait(30)


@pytest.fixture
def server_process(tmp_path):
    """server_process(name, *serve_args) -> ServerProcess (not started); killed by PID at teardown."""
    made: list[ServerProcess] = []

    def make(name: str, *args: str) -> ServerProcess:
        server = ServerProcess(tmp_path / name / "runs", free_port(), list(args), tmp_path / f"{name}.log")
        made.append(server)
        return server

    yield make
    for server in made:
        server.cleanup()


# ---- data and checks ----------------------------------------------------------------------------

@pytest.fixture
def rows_file(tmp_path):
    """rows_file(n) -> path of an n-row TSV for `edge-run train --data`."""
    return lambda n, seed=0: write_rows(tmp_path / f"rows-{n}-{seed}.tsv", n, seed, numbered=True)


@pytest.fixture
def edge_rows(tmp_path):
    """edge_rows(n) -> (examples, task) for `edge-run`'s StreamClient."""
    from mobillm.common.tasks import get_task
    from mobillm.edge_runtime.data import load_examples

    def make(n: int, seed: int = 0):
        task = get_task("sst2")
        return load_examples(write_rows(tmp_path / f"rows-{n}-{seed}.tsv", n, seed, numbered=True), task), task

    return make


def exactly_once(run_dir: Path, n_samples: int, epochs: int) -> dict:
    """Assert the run trained every sample exactly once per epoch; return lost/duplicated counts (0, 0)."""
    from mobillm.trainer.run import read_trained_ids

    per_epoch = read_trained_ids(run_dir)
    assert sorted(per_epoch) == list(range(epochs)), f"epochs trained: {sorted(per_epoch)}"
    lost = duplicated = 0
    for epoch, ids in per_epoch.items():
        counts = Counter(ids)
        lost += sum(1 for k in range(n_samples) if counts[k] == 0)
        duplicated += sum(c - 1 for c in counts.values() if c > 1)
        assert set(counts) <= set(range(n_samples)), f"epoch {epoch}: unknown sample ids"
    assert (lost, duplicated) == (0, 0), f"{lost} samples lost, {duplicated} trained twice"
    return {"samples_lost": lost, "samples_duplicated": duplicated}


@pytest.fixture
def check_exactly_once():
    return exactly_once


def no_temp_files(run_dir: Path) -> list[Path]:
    return sorted(p for p in Path(run_dir).rglob("*") if p.name.endswith(".tmp") or p.name.endswith(".part"))


@pytest.fixture
def temp_files():
    return no_temp_files
