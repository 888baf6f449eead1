"""`trainer serve --cache --select-epochs`: the cached epochs (and peak lr) chosen on held-out cached
samples, then a fresh side network trained on every cached sample with the choice."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mobillm.edge_runtime.simulate import SimDevice, SyntheticTask
from mobillm.trainer import select
from mobillm.trainer.config import ConfigError, OptimConfig, ServerConfig


def records(server, run) -> list[dict]:
    folder = Path(server.config.runs_dir) / run
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_held_out_split_is_seeded_disjoint_and_sized():
    train, held = select.held_out_split(200, 0.1, seed=3)
    assert len(held) == 20 and len(train) == 180
    assert not set(train) & set(held) and sorted(np.concatenate([train, held]).tolist()) == list(range(200))
    again, held_again = select.held_out_split(200, 0.1, seed=3)
    assert np.array_equal(held, held_again) and np.array_equal(train, again)
    assert not np.array_equal(select.held_out_split(200, 0.1, seed=4)[1], held)


def test_a_schedule_that_starts_later_is_the_same_schedule_shifted():
    from mobillm.trainer.core import WarmupLinear

    schedule = WarmupLinear(6, 100)
    assert schedule.factor(0) == 1 / 6 and schedule.factor(5) == 1.0 and schedule.factor(100) == 0.0
    shifted = WarmupLinear(6, 100, start=40)
    assert shifted.factor(40) == schedule.factor(0) and shifted.factor(139) == schedule.factor(99)


def test_the_best_held_out_score_wins_and_ties_go_to_fewer_epochs_then_the_lower_lr(monkeypatch):
    """The choice is the argmax of the held-out metric over epochs x lr; equal scores: the cheaper schedule."""
    scores = {(1, 5e-4): 0.60, (1, 1e-3): 0.70, (2, 1e-3): 0.80, (2, 5e-4): 0.80, (4, 5e-4): 0.80, (4, 1e-3): 0.75}

    class Fake:
        def __init__(self, key):
            self.key = key

    monkeypatch.setattr(select, "fit_candidate", lambda cfg, cache, entries, epochs, lr, *a: Fake((epochs, lr)))
    monkeypatch.setattr(select, "predict_rows", lambda model, rows, taps, device: model.key)
    monkeypatch.setattr(select.tasks, "score", lambda task, out, labels: {"accuracy": scores[out]})

    class Cache:
        def __len__(self):
            return 100

        def gather(self, entries):
            return type("R", (), {"labels": np.zeros(len(entries))})()

    from mobillm.trainer.config import RunConfig, SideConfig

    cfg = RunConfig(run="r", task="sst2", task_type="class", num_labels=2, model_id="m", manifest_sha256="x",
                    device_id="d", mode="pooled", epochs=2, samples_per_epoch=100, taps=[], cache=True,
                    side=SideConfig(), optim=OptimConfig(select_epochs=[4, 2, 1], select_lrs=[1e-3, 5e-4]))
    choice = select.select_schedule(cfg, Cache(), [], 16, torch.device("cpu"), None)
    assert (choice.epochs, choice.lr) == (2, 5e-4) and choice.metric == "accuracy" and choice.held_out == 10
    assert [(c["epochs"], c["lr"]) for c in choice.candidates] == [(1, 5e-4), (1, 1e-3), (2, 5e-4), (2, 1e-3),
                                                                    (4, 5e-4), (4, 1e-3)]


def test_a_cache_run_chooses_its_epochs_then_trains_a_fresh_network_on_every_sample(start_server, taps):
    server = start_server(cache=True, optim=OptimConfig(select_epochs=[2, 4], select_lrs=[1e-3, 3e-3]))
    result = SimDevice(server.url, SyntheticTask(taps, n_samples=200), run="chosen", epochs=2, batch_size=16).run()
    assert result.error is None and result.stop_streaming
    summary = result.model_meta["metrics"]
    choice = summary["selection"]
    assert choice["held_out"] == 20 and choice["metric"] == "accuracy" and len(choice["candidates"]) == 4
    best = max(c["accuracy"] for c in choice["candidates"])
    assert next(c for c in choice["candidates"] if (c["epochs"], c["lr"]) == (choice["epochs"], choice["lr"])
                )["accuracy"] == best
    assert result.done["samples_trained"] == 200 + choice["epochs"] * 200  # the stream, then the chosen epochs
    assert summary["last_epoch_accuracy"] >= 0.95, summary
    steps = records(server, "chosen")
    cached = [r for r in steps if r["source"] == "cache"]
    assert [r["source"] for r in steps[:13]] == ["stream"] * 13 and len(cached) == len(steps) - 13
    # the chosen schedule is a new one: it warms up again from its first cached step and ends at 0
    assert cached[0]["lr"] < cached[1]["lr"] and cached[-1]["lr"] < 0.05 * choice["lr"]
    assert max(r["lr"] for r in cached) == pytest.approx(choice["lr"], rel=0.2)


def test_too_few_cached_samples_keep_the_devices_epochs(start_server, taps, caplog):
    server = start_server(cache=True, optim=OptimConfig(select_epochs=[1, 2]))
    result = SimDevice(server.url, SyntheticTask(taps, n_samples=48), run="small", epochs=2, batch_size=16).run()
    assert result.error is None and result.done["samples_trained"] == 96
    assert "selection" not in result.model_meta["metrics"]
    assert "no selection" in caplog.text


@pytest.mark.parametrize("ensemble", [1, 2])
def test_a_selecting_run_resumes_to_the_same_weights(start_server, taps, ensemble):
    """Stopped after the stream (during the selection or the chosen epochs), restarted with --resume:
    the same choice (seeded), the same final weights (every ensemble member's) as a run never stopped."""
    optim = OptimConfig(select_epochs=[1, 2], ensemble=ensemble)
    server = start_server(cache=True, checkpoint_every=2, optim=optim)
    data = SyntheticTask(taps, n_samples=96)
    reference = SimDevice(server.url, data, run="straight", device_id="phone", epochs=2, batch_size=8).run()
    partial = SimDevice(server.url, data, run="stopped", device_id="phone", epochs=2, batch_size=8)
    partial.run(send_done=False)
    server.stop()
    resumed = start_server(cache=True, resume=True, optim=optim)
    partial.url = resumed.url
    result = partial.run()
    assert result.done == reference.done
    assert result.model_meta["metrics"]["selection"]["epochs"] == reference.model_meta["metrics"]["selection"]["epochs"]
    folder = Path(resumed.config.runs_dir)
    a, b = (torch.load(folder / r / "checkpoint.pt", weights_only=True) for r in ("stopped", "straight"))
    assert all(torch.allclose(a["model"][k], b["model"][k], atol=1e-6) for k in a["model"])
    members_a, members_b = a["selection"]["members"], b["selection"]["members"]
    assert len(members_a) == len(members_b) == ensemble - 1
    assert all(torch.allclose(x[k], y[k], atol=1e-6) for x, y in zip(members_a, members_b) for k in x)


def test_an_ensemble_run_returns_one_graph_averaging_its_members(start_server, taps):
    """--ensemble 3: members 1 and 2 trained with the chosen schedule from their own seeds; the MODEL
    frame is one ONNX graph (the device's contract unchanged) whose logits are the members' mean, and
    `trainer export` rebuilds the same graph from the checkpoint."""
    import onnxruntime as ort

    from mobillm.common.messages import SIDE_OUTPUT, side_input_names
    from mobillm.trainer.config import RunConfig
    from mobillm.trainer.export import random_inputs, reexport
    from mobillm.trainer.model import SideNetwork, members_from_state

    server = start_server(cache=True, optim=OptimConfig(select_epochs=[2], ensemble=3))
    result = SimDevice(server.url, SyntheticTask(taps, n_samples=120), run="ens", epochs=2, batch_size=16).run()
    assert result.error is None and result.model_meta["metrics"]["selection"]["ensemble"] == 3
    folder = Path(server.config.runs_dir) / "ens"
    cfg, state = RunConfig.load(folder), torch.load(folder / "checkpoint.pt", weights_only=True)
    first = SideNetwork(cfg.side)
    first.load_state_dict(state["model"])
    members = [first, *members_from_state(cfg, state["selection"]["members"])]
    assert len(members) == 3 and not torch.equal(members[0].head.weight, members[1].head.weight)
    feeds = random_inputs(cfg.side.tap_widths, batch=5, tokens=4, seed=1)
    names = side_input_names(len(cfg.side.tap_widths))
    with torch.no_grad():
        want = torch.stack([m.eval()(*(torch.from_numpy(feeds[n]) for n in names)) for m in members]).mean(0).numpy()
    got = ort.InferenceSession(result.model, providers=["CPUExecutionProvider"]).run([SIDE_OUTPUT], feeds)[0]
    assert np.abs(got - want).max() < 1e-4
    path, _ = reexport(folder)
    again = ort.InferenceSession(path.read_bytes(), providers=["CPUExecutionProvider"]).run([SIDE_OUTPUT], feeds)[0]
    assert np.abs(again - got).max() < 1e-5


@pytest.mark.parametrize("optim, cache, message", [
    (OptimConfig(select_epochs=[1, 0]), True, "select_epochs must all be >= 1"),
    (OptimConfig(select_epochs=[2], select_lrs=[0.0]), True, "select_lrs must all be > 0"),
    (OptimConfig(select_lrs=[1e-3]), True, "select_lrs needs select_epochs"),
    (OptimConfig(select_epochs=[2], select_share=1.0), True, "select_share must be in (0, 1)"),
    (OptimConfig(select_epochs=[2]), False, "--select-epochs needs --cache"),
    (OptimConfig(ensemble=2), True, "ensemble needs select_epochs"),
    (OptimConfig(select_epochs=[2], ensemble=0), True, "ensemble must be in 1..16"),
])
def test_bad_selection_options_are_refused(optim, cache, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ServerConfig(cache=cache, optim=optim).validate()
