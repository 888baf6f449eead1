"""`kill -9` of `trainer serve` mid-run, restart with --resume on the same port: the real device
reconnects by itself and the run finishes with the same side network as an uninterrupted run.

Tolerance: none. The trainer restores weights, AdamW state, schedule, RNG and progress from its
last checkpoint and the device re-sends (recomputing if needed) every batch after it, in the
same order, so the final weights are bit-identical and the reported metrics equal.
Checkpoints are written to a temp file and renamed: after every kill the checkpoint loads, and
the resumed run removes the dead process's temp file.
"""

import json
import threading
import time

import pytest

torch = pytest.importorskip("torch", exc_type=ModuleNotFoundError)

from mobillm.edge_runtime.backbone import Backbone  # noqa: E402
from mobillm.edge_runtime.stream import StreamClient, TrainOptions  # noqa: E402
from mobillm.trainer.core import CHECKPOINT, SUMMARY, load_checkpoint  # noqa: E402
from mobillm.trainer.run import TRAINED_IDS  # noqa: E402

pytestmark = pytest.mark.slow  # real servers, processes or builds: the `-m "not slow"` loop skips them

SERVE = ["--queue", "4", "--bitplan-every", "0", "--seed", "3"]
EPOCHS = 2


def steps_logged(run_dir) -> int:
    path = run_dir / TRAINED_IDS
    return path.read_text().count("\n") if path.is_file() else 0


def device(backbone, examples, task, url, run="crashy"):
    opts = TrainOptions(server=url, batch_size=8, epochs=EPOCHS, mode="tokens", run=run, progress=False,
                        max_retries=60, retry_base_s=0.05, retry_max_s=0.5)
    return StreamClient(backbone, examples, task, opts)


def test_kill9_and_resume_equals_an_uninterrupted_run(tiny_engine, profile, server_process, fault_proxy, edge_rows,
                                                     check_exactly_once, temp_files, report):
    rows, kills = profile["crash_rows"], profile["crash_kills"]
    examples, task = edge_rows(rows)
    total_steps = EPOCHS * rows // 8
    reference = server_process("reference", *SERVE)
    crashing = server_process("crashing", *SERVE, "--checkpoint-every", "2")
    reference.launch()
    crashing.launch()
    backbone = Backbone(tiny_engine, threads=1)
    reference.wait_ready()
    crashing.wait_ready()

    # The uninterrupted run and the one that gets killed run side by side (two server processes).
    straight = device(backbone, examples, task, reference.url)
    straight_thread = threading.Thread(target=straight.run, daemon=True)
    straight_thread.start()
    # The device talks to the crashing server through a slowed link, so the kills land mid-run.
    link = fault_proxy(crashing.port, rate=150_000)
    trainer = device(backbone, examples, task, f"ws://127.0.0.1:{link.port}")
    thread = threading.Thread(target=trainer.run, daemon=True)
    thread.start()
    run_dir = crashing.runs / "crashy"
    restarts, recoveries = [], []
    for k in range(kills):
        mark = total_steps * (k + 1) // (kills + 2)
        deadline = time.monotonic() + 60
        while steps_logged(run_dir) < mark and time.monotonic() < deadline:
            time.sleep(0.005)
        crashing.kill9()
        killed_at = time.monotonic()
        assert steps_logged(run_dir) < total_steps, "the run finished before the kill; slow the link further"
        state = load_checkpoint(run_dir)  # whole, whatever the kill interrupted
        assert 0 < state["progress"]["step"] <= steps_logged(run_dir)
        restarts.append(crashing.start("--resume"))
        log_mark = crashing.log_text().count("resume at")
        while crashing.log_text().count("resume at") == log_mark and time.monotonic() - killed_at < 60:
            time.sleep(0.01)
        recoveries.append(time.monotonic() - killed_at)
    thread.join(180)
    straight_thread.join(60)
    assert not thread.is_alive() and trainer.model_bytes, "the device did not finish after the restart"
    assert straight.model_bytes
    assert crashing.terminate() == 0 and reference.terminate() == 0

    # Same side network as the uninterrupted run, bit for bit; same metrics.
    ref_dir = reference.runs / "crashy"
    got, want = load_checkpoint(run_dir)["model"], load_checkpoint(ref_dir)["model"]
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    summary, ref_summary = (json.loads((d / SUMMARY).read_text()) for d in (run_dir, ref_dir))
    for key in ("samples_trained", "steps", "last_epoch_loss", "last_epoch_accuracy"):
        assert summary[key] == ref_summary[key], key
    assert trainer.model_meta["metrics"]["last_epoch_loss"] == straight.model_meta["metrics"]["last_epoch_loss"]
    counts = check_exactly_once(run_dir, rows, EPOCHS)
    assert temp_files(run_dir) == [] and (run_dir / CHECKPOINT).is_file()
    assert trainer.stats.reconnects >= kills

    report(kills=kills, restart_s=round(max(restarts), 2), recovered_s=round(max(recoveries), 2),
           reconnects=trainer.stats.reconnects, weights_identical=True, **counts)
