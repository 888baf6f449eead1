"""`trainer serve --cache --replay R`: while the device's next batch is on its way, the server trains up
to R batches drawn from the samples cached so far. Replayed samples stay off the schedule, the epochs
and the cached-epoch order, and with --select-epochs the returned network is the same as without."""

import json
import time
from pathlib import Path

import pytest
import torch

from mobillm.common import wire
from mobillm.edge_runtime.simulate import SimDevice, SyntheticTask
from mobillm.trainer.config import ConfigError, OptimConfig, ServerConfig
from mobillm.trainer.run import read_trained_ids


def records(server, run) -> list[dict]:
    folder = Path(server.config.runs_dir) / run
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def slow_device(url, data, run, **kw) -> SimDevice:
    """A device whose forward takes ~60 ms a batch: the server has gaps to replay in."""
    def frame(seq, ids):
        time.sleep(0.06)
        return wire.batch_frame(data.batch(seq, ids, "pooled"))
    return SimDevice(url, data, run=run, mode="pooled", frame_source=frame, **kw)


@pytest.mark.parametrize("cache, replay, message", [(False, 2, "--replay needs --cache"),
                                                   (True, -1, "replay must be in 0..64")])
def test_bad_replay_options_are_refused(cache, replay, message):
    with pytest.raises(ConfigError, match=message):
        ServerConfig(cache=cache, optim=OptimConfig(replay=replay)).validate()


def test_replay_fills_the_gaps_without_moving_the_schedule_or_the_epochs(start_server, taps):
    data = SyntheticTask(taps, n_samples=96)
    plain = start_server(cache=True)
    reference = slow_device(plain.url, data, "plain", epochs=2, batch_size=8).run()
    server = start_server(cache=True, optim=OptimConfig(replay=3))
    result = slow_device(server.url, data, "replayed", epochs=2, batch_size=8).run()
    assert result.error is None and reference.error is None
    steps = records(server, "replayed")
    replays = [r for r in steps if r["source"] == "replay"]
    assert replays, "a device 60 ms a batch leaves the server gaps: some batches must be replayed"
    gap = 0
    for r in steps:  # at most 3 replayed batches between two streamed ones, and none after the stream
        gap = gap + 1 if r["source"] == "replay" else 0
        assert gap <= 3
    last_stream = max(i for i, r in enumerate(steps) if r["source"] == "stream")
    assert all(r["source"] != "replay" for r in steps[last_stream + 1:])
    # the streamed and cached steps see the learning rates of the run without replay, step for step
    ours = [(r["source"], r["lr"]) for r in steps if r["source"] != "replay"]
    theirs = [(r["source"], r["lr"]) for r in records(plain, "plain")]
    assert [s for s, _ in ours] == [s for s, _ in theirs]
    assert [lr for _, lr in ours] == pytest.approx([lr for _, lr in theirs])
    # replayed samples are counted, but belong to no epoch
    summary = result.model_meta["metrics"]
    assert summary["replayed"]["steps"] == len(replays)
    assert result.done["samples_trained"] == 2 * 96 + summary["replayed"]["samples"]
    runs = Path(server.config.runs_dir)
    assert read_trained_ids(runs / "replayed") == read_trained_ids(Path(plain.config.runs_dir) / "plain")


def test_with_a_selection_the_returned_network_does_not_depend_on_replay(start_server, taps):
    """The streamed network is only the early one; after the selection a fresh network trains on the
    cache, so the result is the same with or without replay (the selection's held-out draw too)."""
    data = SyntheticTask(taps, n_samples=96)
    optim = OptimConfig(select_epochs=[1, 2])
    plain = start_server(cache=True, optim=optim)
    reference = slow_device(plain.url, data, "plain", epochs=2, batch_size=8).run()
    server = start_server(cache=True, optim=OptimConfig(select_epochs=[1, 2], replay=4))
    result = slow_device(server.url, data, "replayed", epochs=2, batch_size=8).run()
    assert result.model_meta["metrics"]["replayed"]["steps"] > 0
    def chosen(r):
        return [(c["epochs"], c["lr"], round(c["accuracy"], 6)) for c in r.model_meta["metrics"]["selection"]["candidates"]]
    assert chosen(result) == chosen(reference)
    a = torch.load(Path(server.config.runs_dir) / "replayed" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(Path(plain.config.runs_dir) / "plain" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
