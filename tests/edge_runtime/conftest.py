"""A TCP proxy on 127.0.0.1 that throttles or cuts the device's uplink, for link-fault tests."""

import asyncio
import threading
import time

import pytest


class LinkProxy:
    """Forwards 127.0.0.1:port -> target; client->server bytes limited to `rate` bytes/s (None = free)."""

    def __init__(self, target_port: int, rate: float | None = None):
        self.target_port, self.rate = target_port, rate
        self.port = None
        self.bytes_up = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._writers = set()

    def start(self) -> int:
        self._thread.start()
        self.server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._handle, "127.0.0.1", 0), self._loop).result()
        self.port = self.server.sockets[0].getsockname()[1]
        return self.port

    def set_rate(self, rate):
        self.rate = rate

    def cut(self):
        """Drop every open connection (as a lost link would)."""
        def close_all():
            for w in list(self._writers):
                w.transport.abort()
        self._loop.call_soon_threadsafe(close_all)

    def stop(self):
        self.cut()
        self._loop.call_soon_threadsafe(self.server.close)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

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
                    await asyncio.sleep(len(data) / self.rate)
                if up:
                    self.bytes_up += len(data)
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()


@pytest.fixture
def link_proxy():
    proxies = []

    def make(target_port, rate=None):
        p = LinkProxy(target_port, rate)
        p.start()
        proxies.append(p)
        return p

    yield make
    for p in proxies:
        p.stop()
