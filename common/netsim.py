"""A simulated link: a TCP proxy on 127.0.0.1 that throttles or cuts the device's uplink.

For trying a deployment's behaviour on a slow or flaky uplink without the network itself:
bench/compare.py runs one mobillm variant through a 60 Mbps uplink (the paper's Table VI), and
the link-fault tests (tests/edge_runtime) cut connections mid-stream and change the rate to
watch the bitwidth adapt. Torch-free, standard library only.

    with LinkProxy(server_port, rate=60e6 / 8) as proxy:   # bytes/s, client -> server only
        edge-run ... --server ws://127.0.0.1:{proxy.port}/
"""

from __future__ import annotations

import asyncio
import threading


class LinkProxy:
    """Forwards 127.0.0.1:port -> 127.0.0.1:target_port; client->server bytes limited to `rate` bytes/s
    (None = free). Runs its own event loop in a daemon thread."""

    def __init__(self, target_port: int, rate: float | None = None):
        self.target_port, self.rate = target_port, rate
        self.port: int | None = None
        self.bytes_up = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="link-proxy")
        self._writers: set = set()

    def start(self) -> int:
        """Bind a free port and start forwarding; returns the port."""
        self._thread.start()
        self.server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._handle, "127.0.0.1", 0), self._loop).result()
        self.port = self.server.sockets[0].getsockname()[1]
        return self.port

    def set_rate(self, rate: float | None) -> None:
        self.rate = rate

    def cut(self) -> None:
        """Drop every open connection (as a lost link would)."""
        def close_all():
            for w in list(self._writers):
                w.transport.abort()
        self._loop.call_soon_threadsafe(close_all)

    def stop(self) -> None:
        self.cut()
        self._loop.call_soon_threadsafe(self.server.close)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def __enter__(self) -> "LinkProxy":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    async def _handle(self, reader, writer):
        try:
            r2, w2 = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, w2}
        await asyncio.gather(self._pipe(reader, w2, up=True), self._pipe(r2, writer, up=False),
                             return_exceptions=True)
        self._writers -= {writer, w2}

    async def _pipe(self, reader, writer, up):
        try:
            while data := await reader.read(16384):
                if up and self.rate:
                    # Pacing, not synchronisation: each chunk takes the time the link would need for it.
                    await asyncio.sleep(len(data) / self.rate)
                if up:
                    self.bytes_up += len(data)
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()
