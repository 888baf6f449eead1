"""A simulated link: a TCP proxy on 127.0.0.1 that throttles or cuts the device's connection.

For trying a deployment's behaviour on a slow or flaky link without the network itself:
bench/paper/compare.py runs one mobillm variant through a 60 Mbps uplink (the paper's Table VI),
bench/paper/federated.py gives each simulated device its own link speed in both directions, the
link-fault tests (tests/edge_runtime) cut connections mid-stream and change the rate to watch
the bitwidth adapt, and the reliability tests' FaultProxy (tests/reliability/conftest.py)
subclasses it to cut connections at random byte offsets. Torch-free, standard library only.

    with LinkProxy(server_port, rate=60e6 / 8) as proxy:   # bytes/s, client -> server only
        edge-run ... --server ws://127.0.0.1:{proxy.port}/
"""

from __future__ import annotations

import asyncio
import socket
import threading
from dataclasses import dataclass, field
from typing import Any

CHUNK = 16384  # bytes read per forwarding step: the granularity of pacing and of cuts
SLACK = 0.01  # seconds a paced link may catch up on after a late wake-up (a burst of at most rate x SLACK)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago, for a child process to listen on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, proc=None, timeout: float = 120.0, what: str = "the server") -> float:
    """Block until something accepts TCP connections on 127.0.0.1:port; returns the seconds waited.

    With `proc` (a subprocess.Popen), an early exit of that process fails at once instead of
    waiting out the timeout."""
    import subprocess
    import time

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before listening on port {port}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return time.monotonic() - t0
        except OSError:
            pass
        if proc is None:
            time.sleep(0.2)
        else:
            try:  # waiting on the process is the poll interval, and notices an early exit
                proc.wait(0.2)
            except subprocess.TimeoutExpired:
                pass
    raise RuntimeError(f"{what} did not listen on port {port} within {timeout:.0f} s")


@dataclass
class Connection:
    """One proxied client connection: its two stream writers and the bytes forwarded each way."""

    writers: tuple
    sent_up: int = 0
    sent_down: int = 0
    closed: bool = False  # set when the connection was cut on purpose (nothing more is forwarded)
    plan: Any = field(default=None)  # a subclass's per-connection state (FaultProxy: where it dies)


class LinkProxy:
    """Forwards 127.0.0.1:port -> 127.0.0.1:target_port; client->server bytes limited to `rate` bytes/s and
    server->client bytes to `down_rate` (None = free); with `capture`, every uplink byte forwarded is kept
    in `captured`. Runs its own event loop in a daemon thread.

    Subclasses shape the traffic through two hooks: `opened(conn)` when a client connects and
    `forward(conn, data, up)`, which returns the bytes to pass on and whether to cut the connection
    after them (`close(conn)` then ends it)."""

    def __init__(self, target_port: int, rate: float | None = None, down_rate: float | None = None,
                 capture: bool = False):
        self.target_port, self.rate, self.down_rate = target_port, rate, down_rate
        self.captured = bytearray() if capture else None
        self.port: int | None = None
        self.bytes_up = 0
        self.connections = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name=type(self).__name__)
        self._writers: set = set()

    def start(self) -> int:
        """Bind a free port and start forwarding; returns the port."""
        self._thread.start()
        self.server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._handle, "127.0.0.1", 0), self._loop).result(10)
        self.port = self.server.sockets[0].getsockname()[1]
        return self.port

    def set_rate(self, rate: float | None) -> None:
        """Change the uplink limit (bytes/s; None = free) for the bytes forwarded from now on."""
        self.rate = rate

    def cut(self) -> None:
        """Drop every open connection (as a lost link would)."""
        def close_all():
            for w in list(self._writers):
                w.transport.abort()
        self._loop.call_soon_threadsafe(close_all)

    def stop(self) -> None:
        """Cut every connection, stop listening and end the proxy's thread."""
        self.cut()
        self._loop.call_soon_threadsafe(self.server.close)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def __enter__(self) -> "LinkProxy":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def opened(self, conn: Connection) -> None:
        """Hook: a client connected (and the target accepted)."""

    def forward(self, conn: Connection, data: bytes, up: bool) -> tuple[bytes, bool]:
        """Hook: (the bytes of `data` to pass on, whether to cut the connection right after them)."""
        return data, False

    def close(self, conn: Connection) -> None:
        """Hook: end a connection that `forward` cut (the default closes both sides cleanly)."""
        conn.closed = True
        for w in conn.writers:
            w.close()

    async def _handle(self, reader, writer):
        self.connections += 1
        try:
            r2, w2 = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:  # the server is down (restarting): the device sees a failed handshake
            writer.transport.abort()
            return
        conn = Connection((writer, w2))
        self.opened(conn)
        self._writers |= {writer, w2}
        await asyncio.gather(self._pipe(reader, w2, conn, up=True), self._pipe(r2, writer, conn, up=False),
                             return_exceptions=True)
        self._writers -= {writer, w2}

    async def _pipe(self, reader, writer, conn: Connection, up: bool):
        loop = asyncio.get_running_loop()
        due = 0.0  # when the link is done with the bytes forwarded so far
        try:
            while data := await reader.read(CHUNK):
                if conn.closed:
                    return
                data, cut = self.forward(conn, data, up)
                rate = self.rate if up else self.down_rate
                if rate and not cut:
                    # Pacing, not synchronisation: each chunk takes the time the link would need for it, on a
                    # schedule, so that late wake-ups and the proxy's own work do not slow the link below `rate`
                    # (only a link idle for longer than SLACK starts a new schedule).
                    due = max(due, loop.time() - SLACK) + len(data) / rate
                    await asyncio.sleep(due - loop.time())
                if up:
                    conn.sent_up += len(data)
                    self.bytes_up += len(data)
                    if self.captured is not None:
                        self.captured.extend(data)
                else:
                    conn.sent_down += len(data)
                writer.write(data)
                await writer.drain()
                if cut:
                    self.close(conn)
                    return
        except (ConnectionError, OSError):
            pass
        finally:
            if not conn.closed:
                writer.close()
