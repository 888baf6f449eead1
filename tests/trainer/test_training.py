"""End to end: SimDevice -> real TrainerServer on 127.0.0.1 -> trained side network."""

import json
import threading
from pathlib import Path

import numpy as np
import torch

from mobillm.common import wire
from mobillm.edge_runtime.simulate import SimDevice, SyntheticTask
from mobillm.trainer.config import RunConfig, SideConfig


def run_folder(server, name) -> Path:
    return Path(server.config.runs_dir) / name


def weights(folder: Path) -> dict:
    return torch.load(folder / "checkpoint.pt", map_location="cpu", weights_only=True)["model"]


def test_separable_classification_trains_below_0_2(start_server, taps):
    """256 samples x 3 epochs of a separable 2-class task: last-epoch loss < 0.2, accuracy >= 0.95."""
    server = start_server(bitplan_every=10, checkpoint_every=20)
    device = SimDevice(server.url, SyntheticTask(taps, n_samples=256), task="sst2", epochs=3, batch_size=16)
    result = device.run()
    assert result.error is None and result.welcome["resume"]["samples_done"] == 0
    metrics = result.model_meta["metrics"]
    assert metrics["last_epoch_loss"] < 0.2, metrics
    assert metrics["last_epoch_accuracy"] >= 0.95, metrics
    assert result.done == {"samples_trained": 768, "steps": 48}
    assert [c["acked_seq"] for c in result.credits] == list(range(48))  # every batch acknowledged, in order
    assert result.bitplans and all(len(b["importance"]) == len(taps) for b in result.bitplans)
    folder = run_folder(server, result.welcome["run"])
    cfg = RunConfig.load(folder)
    assert cfg.task == "sst2" and cfg.side.tap_widths == [32, 32, 16] and cfg.side.side_width == 32
    steps = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == 48
    assert {"loss", "lr", "samples_per_s", "bytes_received", "queue_depth", "wait_s", "idle_frac"} <= steps[0].keys()
    assert steps[-1]["lr"] < steps[len(steps) // 2]["lr"]  # linear decay
    assert (folder / "side_network.onnx").read_bytes() == result.model


def test_regression_with_mean_pooling_and_gelu(start_server, taps):
    server = start_server(side=SideConfig(pooling="mean", activation="gelu"))
    """Mean pooling dilutes the last-token signal over 2..8 tokens: labels have variance 1/3, MSE must reach < 0.1."""
    data = SyntheticTask(taps, n_samples=192, task_type="regression", num_labels=1, signal=6.0)
    result = SimDevice(server.url, data, task="stsb", epochs=3, batch_size=16).run()
    metrics = result.model_meta["metrics"]
    assert result.model_meta["config"]["pooling"] == "mean" and result.model_meta["config"]["out_dim"] == 1
    assert metrics["last_epoch_loss"] < 0.1 and metrics["last_epoch_pearson"] > 0.8, metrics


def test_cache_mode_streams_one_epoch_and_trains_the_rest(start_server, taps):
    server = start_server(cache=True)
    data = SyntheticTask(taps, n_samples=200)
    result = SimDevice(server.url, data, epochs=3, batch_size=16).run()
    assert result.welcome["cache"] is True and result.stop_streaming
    assert 200 <= result.samples_sent <= 200 + 8 * 16  # at most a queue's worth past the epoch
    assert result.done["samples_trained"] == 600
    assert result.model_meta["metrics"]["last_epoch_loss"] < 0.2
    folder = run_folder(server, result.welcome["run"])
    sources = [json.loads(line)["source"] for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert sources.count("stream") == 13 and sources[13:] == ["cache"] * (len(sources) - 13)
    assert (folder / "cache" / "tap0.codes").stat().st_size == 200 * 16  # one nf4 row of 32 per sample


def test_two_tasks_train_at_once_and_stay_separate(start_server, taps):
    server = start_server()
    cls = SimDevice(server.url, SyntheticTask(taps, n_samples=160, num_labels=3), task="mnli", mode="pooled",
                    epochs=2, batch_size=16, device_id="phone-a")
    reg = SimDevice(server.url, SyntheticTask(taps[:2], n_samples=96, task_type="regression", seed=5), task="stsb",
                    epochs=2, batch_size=8, device_id="phone-b")
    results = {}
    threads = [threading.Thread(target=lambda d=d: results.__setitem__(d.task, d.run())) for d in (cls, reg)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    a, b = results["mnli"], results["stsb"]
    assert a.error is None and b.error is None
    assert a.welcome["run"] != b.welcome["run"]
    assert a.done["samples_trained"] == 320 and b.done["samples_trained"] == 192
    assert a.model_meta["config"]["out_dim"] == 3 and b.model_meta["config"]["out_dim"] == 1
    assert b.model_meta["config"]["tap_widths"] == [32, 32]
    for result, device in ((a, cls), (b, reg)):
        cfg = RunConfig.load(run_folder(server, result.welcome["run"]))
        assert (cfg.task, cfg.device_id, cfg.mode) == (device.task, device.device_id, device.mode)


def test_tokens_and_pooled_runs_train_identical_networks(start_server, taps):
    """Same samples, same seed: streaming every token or only the head's rows gives the same weights."""
    server = start_server()
    data = SyntheticTask(taps, n_samples=64)
    sent = {}
    for mode in ("tokens", "pooled"):
        result = SimDevice(server.url, data, mode=mode, epochs=2, batch_size=16, run=f"run-{mode}").run()
        sent[mode] = result.bytes_sent
    assert sent["tokens"] > 2 * sent["pooled"]
    a, b = weights(run_folder(server, "run-tokens")), weights(run_folder(server, "run-pooled"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not np.allclose(a["head.weight"].numpy(), 0)


def test_bits_auto_lets_tap_formats_change_between_batches(start_server, taps):
    """A device adapting to its uplink (HELLO bits 'auto') may switch a tap's format batch to batch."""
    server = start_server()
    nf4 = SyntheticTask(taps, n_samples=64)
    int8 = SyntheticTask([{**t, "fmt": "int8"} for t in taps], n_samples=64)  # same samples, other format

    def frames(seq, ids):
        return wire.batch_frame((int8 if seq % 2 else nf4).batch(seq, ids, "tokens"))

    result = SimDevice(server.url, nf4, epochs=2, batch_size=16, bits="auto", frame_source=frames).run()
    assert result.error is None and result.done["samples_trained"] == 128


def test_fixed_bits_with_cache(start_server, taps):
    """bits 'int8': every tap arrives as int8 whatever the engine's format; the cache stores int8 rows."""
    server = start_server(cache=True)
    int8 = SyntheticTask([{**t, "fmt": "int8"} for t in taps], n_samples=48)
    engine_taps = SyntheticTask(taps, n_samples=48)
    result = SimDevice(server.url, engine_taps, epochs=2, batch_size=16, bits="int8",
                       frame_source=lambda seq, ids: wire.batch_frame(int8.batch(seq, ids, "tokens"))).run()
    assert result.error is None and result.done["samples_trained"] == 96
    folder = run_folder(server, result.welcome["run"])
    assert (folder / "cache" / "tap0.codes").stat().st_size == 48 * 32  # int8: one byte per value
    auto = SimDevice(server.url, engine_taps, epochs=2, bits="auto", run="auto-with-cache").run()
    assert auto.error["code"] == "bad_hello" and "auto" in auto.error["message"]
