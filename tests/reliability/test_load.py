"""32 devices at once against one `trainer serve` process: every session finishes, every sample
is trained exactly once, and the server's resident memory stays under a bound derived from its
queues.

The bound. Credits cap what a device can have in the server: at most `--queue` batches sent and
not yet taken for training, plus the one being trained, plus one being parsed (a device that
sends without a credit is refused with `no_credit`). So, per device,

    (queue + 2) x frame bytes
    + 24 x side-network parameters  (fp32 weights, grads, AdamW m and v; the ONNX bytes and the
                                     ONNX Runtime session that checks the export at the end)
    + 8 MiB                         (its training thread, autograd buffers, the ORT session, files)

on top of the idle server's RSS, plus 128 MiB for the allocator and the sockets.
"""

import re
import threading
import time

import pytest

torch = pytest.importorskip("torch", exc_type=ModuleNotFoundError)

from mobillm.common import wire  # noqa: E402
from mobillm.edge_runtime.simulate import SimDevice, SyntheticTask  # noqa: E402
from mobillm.trainer.config import SideConfig  # noqa: E402
from mobillm.trainer.model import build_side_network  # noqa: E402

pytestmark = pytest.mark.slow  # real servers, processes or builds: the `-m "not slow"` loop skips them

QUEUE = 4
BATCH = 8


def peak_concurrency(log: str) -> int:
    """Most sessions streaming at once, from the server's log (session start ... run finished)."""
    live = peak = 0
    for line in log.splitlines():
        if re.search(r"session s\d+: device .* resume at", line):
            live += 1
            peak = max(peak, live)
        elif re.search(r"run \S+ finished:", line):
            live -= 1
    return peak


def test_32_devices_at_once(profile, server_process, check_exactly_once, report):
    n_dev, samples, hidden, n_taps = (profile[k] for k in ("load_devices", "load_samples", "load_hidden", "load_taps"))
    taps = [{"layer": i + 1, "hidden": hidden, "fmt": "nf4", "block_size": 64} for i in range(n_taps)]
    data = SyntheticTask(taps, n_samples=samples, min_len=profile["load_len"][0], max_len=profile["load_len"][1])
    # Every device streams the same synthetic data; the frames are quantized once, with the real codec.
    stream = data.stream(1)
    frames = [wire.batch_frame(data.batch(seq, stream[pos:pos + BATCH], "tokens"))
              for seq, pos in enumerate(range(0, samples, BATCH))]
    frame_bytes = max(len(f) for f in frames)

    # Every device connects from 127.0.0.1 at the same moment: the per-address pre-auth cap must admit them all.
    server = server_process("load", "--queue", str(QUEUE), "--checkpoint-every", "100000", "--bitplan-every", "0",
                            "--max-unauth-per-address", str(n_dev))
    server.start()
    idle_rss = server.rss_mb()
    params = sum(p.numel() for p in build_side_network(SideConfig().for_taps([hidden] * n_taps, 2), 0).parameters())
    per_device_mb = ((QUEUE + 2) * frame_bytes + 24 * params) / 2**20 + 8
    bound_mb = idle_rss + n_dev * per_device_mb + 128

    results: dict[int, object] = {}
    start = threading.Barrier(n_dev)

    def device(i: int) -> None:
        sim = SimDevice(server.url, data, mode="tokens", batch_size=BATCH, device_id=f"dev-{i}", run=f"load-{i}",
                        frame_source=lambda seq, ids: frames[seq])
        start.wait()
        results[i] = sim.run(timeout=120)

    rss_samples = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            rss_samples.append(server.rss_mb())
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    threads = [threading.Thread(target=device, args=(i,), daemon=True) for i in range(n_dev)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    wall = time.perf_counter() - t0
    done.set()
    watcher.join(5)
    peak_rss = server.rss_mb("VmHWM")
    log = server.log_text()
    assert server.terminate() == 0

    assert len(results) == n_dev and all(r.error is None and r.done for r in results.values()), \
        [r.error for r in results.values() if r.error]
    assert all(r.done["samples_trained"] == samples for r in results.values())
    lost = duplicated = 0
    for i in range(n_dev):
        counts = check_exactly_once(server.runs / f"load-{i}", samples, 1)
        lost, duplicated = lost + counts["samples_lost"], duplicated + counts["samples_duplicated"]
    assert peak_rss <= bound_mb, f"server peak RSS {peak_rss:.0f} MiB > bound {bound_mb:.0f} MiB"
    total_bytes = sum(r.bytes_sent for r in results.values())
    report(devices=n_dev, devices_finished=len(results), peak_concurrent=peak_concurrency(log),
           frame_kib=round(frame_bytes / 1024, 1), idle_rss_mib=round(idle_rss), peak_rss_mib=round(peak_rss),
           rss_bound_mib=round(bound_mb), samples_per_s=round(n_dev * samples / wall, 1),
           mb_per_s=round(total_bytes / wall / 1e6, 2), wall_s=round(wall, 2),
           samples_lost=lost, samples_duplicated=duplicated)
