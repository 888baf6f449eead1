"""A link that keeps dropping: the real device (`StreamClient`) reconnects with back-off through a
proxy that cuts the connection at random byte offsets, mid-frame in either direction and during
handshakes, many times in one run. At the end every sample was trained exactly once per epoch
(from the server's runs/<run>/trained_ids.jsonl), and the captured uplink holds no text."""

import time

import pytest

pytest.importorskip("torch", exc_type=ModuleNotFoundError)

from mobillm.edge_runtime.backbone import Backbone  # noqa: E402
from mobillm.edge_runtime.stream import StreamClient, TrainOptions  # noqa: E402
from mobillm.trainer.config import ServerConfig  # noqa: E402
from mobillm.trainer.server import TrainerServer  # noqa: E402

pytestmark = pytest.mark.slow  # real servers, processes or builds: the `-m "not slow"` loop skips them


def test_many_random_drops_lose_and_repeat_nothing(tiny_engine, tmp_path, profile, fault_proxy, edge_rows,
                                                   check_exactly_once, report):
    rows, epochs, drops = profile["link_rows"], profile["link_epochs"], profile["link_drops"]
    examples, task = edge_rows(rows)
    server = TrainerServer(ServerConfig(port=0, runs_dir=str(tmp_path / "runs"), queue_size=4, threads=1,
                                        checkpoint_every=10))
    port = server.start()
    try:
        # Uplink cuts every ~12 KiB on average; a BATCH of 8 rows here is ~16 KiB, so most land mid-frame.
        proxy = fault_proxy(port, drops=drops, mean_up=12288, mean_down=512, capture=True, seed=1)
        opts = TrainOptions(server=f"ws://127.0.0.1:{proxy.port}", batch_size=8, epochs=epochs, mode="tokens",
                            run="flaky", progress=False, max_retries=20, retry_base_s=0.02, retry_max_s=0.5)
        trainer = StreamClient(Backbone(tiny_engine, threads=1), examples, task, opts)
        t0 = time.perf_counter()
        stats = trainer.run()
        wall = time.perf_counter() - t0
    finally:
        server.stop()

    assert proxy.total_drops >= drops * 0.75, (proxy.drops, proxy.connections)
    assert stats.reconnects >= proxy.total_drops - 1  # a cut after the model arrived needs no reconnect
    assert trainer.model_meta["metrics"]["samples_trained"] == epochs * rows
    counts = check_exactly_once(tmp_path / "runs" / "flaky", rows, epochs)

    # Privacy on the wire, on this run's captured uplink (every byte, re-sends included).
    blob = bytes(proxy.captured)
    assert len(blob) > 100_000
    for ex in examples[:: max(1, rows // 40)]:
        assert ex.texts[0].encode() not in blob
    for word in ("superb", "boring", "movie", "row 1"):
        assert word.encode() not in blob

    report(drops_survived=proxy.total_drops, drops_by_kind=dict(proxy.drops), reconnects=stats.reconnects,
           samples=epochs * rows, uplink_bytes=len(blob), wall_s=round(wall, 2), **counts)
