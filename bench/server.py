"""The one way benchmarks and tests start a `trainer serve`: its own process, listening on
127.0.0.1 on a free port, stopped by its PID (SIGTERM, then SIGKILL if it lingers).

    with TrainerServe(runs, "--threads", "1", log=work / "server.log") as server:  # listening
        ...  # server.url, server.port, server.proc

Without the `with`: launch now and wait_ready later (a benchmark starting its servers while it
prepares), restart on the same port (a crash test), or the ranks of one world (`env` with RANK:
rank r listens on --port + r, as under torchrun; stop_all stops them together). A server inside the
calling process is `TrainerServer(ServerConfig(port=0, ...))`, itself a context manager.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Callable

from mobillm.common.netsim import free_port, wait_listening


class TrainerServe:
    """`trainer serve --host 127.0.0.1 --port PORT --runs RUNS *args` in a child process."""

    def __init__(self, runs: Path | str, *args, port: int | None = None, log: Path | str | None = None,
                 env: dict | None = None, wrap: Callable[[list[str]], list[str]] | None = None):
        """`log`: stdout and stderr (else discarded); `env`: the child's environment; `wrap`: the
        command around it (a memory cap: `prlimit --as=N -- cmd`)."""
        self.runs, self.args = Path(runs), [str(a) for a in args]
        self.port = port or free_port()
        self.listen_port = self.port + int((env or {}).get("RANK", 0))  # a rank of a world: --port + RANK
        self.log_path = Path(log) if log is not None else None
        self.env, self.wrap = env, wrap
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        scheme = "wss" if "--certfile" in self.args else "ws"
        return f"{scheme}://127.0.0.1:{self.listen_port}"

    def launch(self, *extra) -> TrainerServe:
        """Start the process (with `extra` arguments this time) without waiting for it to listen; the
        log is started afresh, then appended to by each restart."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        cmd = [sys.executable, "-m", "mobillm.trainer.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
               "--runs", str(self.runs), *self.args, *map(str, extra)]
        self.starts += 1
        if self.log_path is None:
            self.proc = subprocess.Popen(self.wrap(cmd) if self.wrap else cmd, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL, env=self.env)
        else:
            with open(self.log_path, "w" if self.starts == 1 else "a") as log:
                self.proc = subprocess.Popen(self.wrap(cmd) if self.wrap else cmd, stdout=log,
                                             stderr=subprocess.STDOUT, env=self.env)
        return self

    def wait_ready(self, timeout: float = 120.0) -> float:
        """Block until it listens (fails at once if the process exits); the seconds waited."""
        assert self.proc is not None, "not launched"
        where = f" (see {self.log_path})" if self.log_path else ""
        return wait_listening(self.listen_port, self.proc, timeout, what=f"trainer serve{where}")

    def start(self, *extra, timeout: float = 120.0) -> float:
        """launch, then wait_ready: the seconds until it listened."""
        self.launch(*extra)
        return self.wait_ready(timeout)

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL after `timeout` s; the exit status (None: never launched)."""
        return stop_all([self], timeout)[0]

    def __enter__(self) -> TrainerServe:
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def stop_all(servers: list[TrainerServe], timeout: float = 15.0) -> list[int | None]:
    """SIGTERM to every server first (the ranks of a world shut down together), then wait for each,
    SIGKILL to one that outlives `timeout`; their exit statuses."""
    running = [s.proc for s in servers if s.proc is not None and s.proc.poll() is None]
    for proc in running:
        proc.terminate()  # by PID: only processes this module started
    for proc in running:
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)
    return [s.proc.returncode if s.proc is not None else None for s in servers]

