"""The uplink meter reads the link, not the socket buffers: frames through a throttled LinkProxy."""

import asyncio

import pytest
import websockets

from mobillm.edge_runtime.bitplan import UplinkMeter
from mobillm.edge_runtime.stream import send_timed

FRAME = 192 * 1024  # a tokens-mode batch of a small engine; several fit in the socket buffers on the way
FRAMES = 8


async def _consume(ws):
    async for _ in ws:
        pass


async def _measure(proxy_port: int, meter: UplinkMeter) -> float:
    """Send FRAMES frames back to back through the proxy; returns what send time alone would read (B/s)."""
    async with websockets.connect(f"ws://127.0.0.1:{proxy_port}", compression=None) as ws:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        for _ in range(FRAMES):
            await send_timed(ws, bytes(FRAME), meter)
        send_rate = FRAMES * FRAME / (loop.time() - t0)
        await asyncio.wait_for(await ws.ping(), 10)  # every frame's pong is in (pongs come back in order)
    return send_rate


@pytest.mark.parametrize("rate", [1.5e6, 4e6])
def test_estimate_follows_the_throttled_rate(link_proxy, rate):
    async def main():
        async with websockets.serve(_consume, "127.0.0.1", 0, compression=None, max_size=None) as server:
            proxy = link_proxy(server.sockets[0].getsockname()[1], rate=rate)
            meter = UplinkMeter()
            return meter, await _measure(proxy.port, meter)

    meter, send_rate = asyncio.run(main())
    estimate = meter.bytes_per_second
    assert estimate is not None and 0.75 * rate <= estimate <= 1.25 * rate, (estimate, rate, send_rate)


def test_idle_gaps_are_not_link_time():
    meter = UplinkMeter()
    meter.delivered(1000, started=0.0, arrived=1.0)
    meter.delivered(1000, started=5.0, arrived=6.0)  # the link was idle from 1 to 5
    meter.delivered(1000, started=5.5, arrived=7.0)  # queued behind the previous frame: 6 to 7
    assert meter.bytes_per_second == pytest.approx(1000.0)
