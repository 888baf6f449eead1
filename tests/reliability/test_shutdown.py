"""SIGTERM to `trainer serve`: it stops accepting, trains what it already queued, checkpoints at
that exact position, tells every connected device (ERROR `shutting_down`, close 1001) and exits 0.
The device treats that like a dropped link and finishes against the restarted server."""

import threading
import time

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

pytest.importorskip("torch", exc_type=ModuleNotFoundError)

from mobillm.common import wire  # noqa: E402
from mobillm.edge_runtime.backbone import Backbone  # noqa: E402
from mobillm.edge_runtime.simulate import SimDevice, SyntheticTask  # noqa: E402
from mobillm.edge_runtime.stream import StreamClient, TrainOptions  # noqa: E402
from mobillm.trainer.core import load_checkpoint  # noqa: E402
from mobillm.trainer.run import TRAINED_IDS  # noqa: E402

pytestmark = pytest.mark.slow  # real servers, processes or builds: the `-m "not slow"` loop skips them

EPOCHS = 2
TAPS = [{"layer": 1, "hidden": 32, "fmt": "nf4", "block_size": 16}]


def steps_logged(run_dir) -> int:
    path = run_dir / TRAINED_IDS
    return path.read_text().count("\n") if path.is_file() else 0


def test_sigterm_checkpoints_tells_devices_and_exits_0(tiny_engine, profile, server_process, fault_proxy, edge_rows,
                                                      check_exactly_once, temp_files, report):
    rows = profile["crash_rows"]
    examples, task = edge_rows(rows)
    # No periodic checkpoints: the only one before the restart is the one SIGTERM writes.
    server = server_process("graceful", "--queue", "4", "--checkpoint-every", "100000", "--bitplan-every", "0")
    server.launch()
    backbone = Backbone(tiny_engine, threads=1)
    server.wait_ready()
    link = fault_proxy(server.port, rate=150_000)
    trainer = StreamClient(backbone, examples, task, TrainOptions(
        server=f"ws://127.0.0.1:{link.port}", batch_size=8, epochs=EPOCHS, mode="tokens", run="graceful",
        progress=False, max_retries=60, retry_base_s=0.05, retry_max_s=0.5))
    thread = threading.Thread(target=trainer.run, daemon=True)
    thread.start()

    # A second device, connected and idle on its own run, must hear about the shutdown too.
    idle = SimDevice(server.url, SyntheticTask(TAPS, n_samples=8), run="idle", device_id="idle")
    with connect(server.url, compression=None) as ws:
        ws.send(wire.encode_frame(wire.MsgType.HELLO, idle.hello()))
        assert wire.decode_frame(ws.recv(timeout=30)).type == wire.MsgType.WELCOME
        run_dir = server.runs / "graceful"
        deadline = time.monotonic() + 60
        while steps_logged(run_dir) < EPOCHS * rows // 8 // 3 and time.monotonic() < deadline:
            time.sleep(0.005)
        t0 = time.perf_counter()
        assert server.terminate() == 0
        stop_s = time.perf_counter() - t0
        goodbye = wire.decode_frame(ws.recv(timeout=30))
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=30)
    assert goodbye.type == wire.MsgType.ERROR and goodbye.meta["code"] == "shutting_down", goodbye.meta
    assert ws.protocol.close_rcvd.code == 1001
    assert "SIGTERM" in server.log_text()

    # Checkpointed at the exact position: every step it logged, nothing after.
    trained = steps_logged(run_dir)
    assert 0 < trained < EPOCHS * rows // 8, "SIGTERM should land mid-run"
    assert load_checkpoint(run_dir)["progress"]["step"] == trained and temp_files(run_dir) == []

    restart_s = server.start("--resume")
    thread.join(180)
    assert not thread.is_alive() and trainer.model_bytes
    assert "shutting_down" in trainer.stats.reconnect_reasons, trainer.stats.reconnect_reasons
    assert server.terminate() == 0
    counts = check_exactly_once(run_dir, rows, EPOCHS)
    report(stop_s=round(stop_s, 2), restart_s=round(restart_s, 2), steps_at_sigterm=trained,
           reconnect_reasons=sorted(set(trainer.stats.reconnect_reasons)), **counts)
