"""Run folders written before the one training loop (main at d0a0b28; data/make_main_runs.py) still
resume: a restarted server continues each from its checkpoint, at the position it saved, and a
single-device run ends with the weights the old code reached without interruption.

The stored weights were computed on another machine, and float training is not bit-identical
across CPUs and library builds, so they are compared within TOLERANCE, derived from measured
rounding (test_tolerance_covers_measured_rounding re-measures it wherever it runs): resuming with
every starting weight moved by one ulp (a different rounding of every value at once) moved the
final weights by at most 2.4e-7 (1-2 ulp of the largest weights, ~1.0), 2 torch threads instead
of 1 by 9.3e-10; on the machine that wrote them the difference is 0. TOLERANCE is 40x the
largest, and 500x below how far the resumed steps move the weights (5.0e-3 single, 6.4e-3 cached),
which is asserted too, so a resume that trains the wrong steps cannot pass. Bit for bit only
within one run (the same resume twice).
"""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from mobillm.edge_runtime.simulate import SimDevice, SyntheticTask
from mobillm.trainer.config import FedConfig, SideConfig

DATA = Path(__file__).parent / "data" / "main_runs"
SIDE = SideConfig(bottleneck=8)
FAMILIES = [([{"layer": i, "hidden": 32, "fmt": "nf4", "block_size": 16} for i in (1, 2, 3, 4)], 4),
            ([{"layer": i, "hidden": 48, "fmt": "int8", "block_size": 16} for i in (2, 4, 6)], 6)]
ON_CPU = os.environ.get("MOBILLM_TEST_DEVICE", "cpu") == "cpu"  # the stored weights were trained on the CPU
TOLERANCE = 1e-5  # max |difference| of any weight from the stored reference (module docstring)
# (folder, run, SyntheticTask rows, epochs, ServerConfig extras, the stored uninterrupted weights)
RUNS = {"single": ("restarted", 96, 2, {}, "straight.pt"),
        "cache": ("cached", 64, 3, {"cache": True}, "straight-cached.pt")}


def copy_runs(tmp_path: Path, kind: str) -> Path:
    shutil.copytree(DATA / kind, tmp_path / kind)
    return tmp_path / kind


def checkpoint(folder: Path) -> dict:
    return torch.load(folder / "checkpoint.pt", map_location="cpu", weights_only=True)


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def assert_matches_stored(model: dict, kind: str) -> None:
    """`model` within TOLERANCE of the stored uninterrupted weights, and far from where it resumed."""
    run, *_, reference = RUNS[kind]
    stored = torch.load(DATA / reference, weights_only=True)
    assert max_difference(model, stored) <= TOLERANCE
    assert max_difference(model, checkpoint(DATA / kind / run)["model"]) > 100 * TOLERANCE


def resume(start_server, taps, folder: Path, kind: str, prepare=None) -> dict:
    """Resume the stored run `kind` from a copy in `folder` to its end (`prepare(run folder)` first);
    its final weights."""
    run, n, epochs, extras, _ = RUNS[kind]
    runs = copy_runs(folder, kind)
    if prepare is not None:
        prepare(runs / run)
    srv = start_server(runs_dir=str(runs), resume=True, **extras)
    result = SimDevice(srv.url, SyntheticTask(taps, n_samples=n), run=run, device_id="phone", epochs=epochs,
                       batch_size=8).run()
    assert result.error is None
    srv.stop()
    return checkpoint(runs / run)["model"]


def one_ulp_off(folder: Path, seed: int) -> None:
    """Move every float weight of the checkpoint in `folder` one ulp up or down (at random)."""
    saved = checkpoint(folder)
    g = torch.Generator().manual_seed(seed)
    for name, w in saved["model"].items():
        if w.is_floating_point():
            saved["model"][name] = torch.nextafter(w, torch.where(torch.rand(w.shape, generator=g) < 0.5,
                                                                  -torch.inf, torch.inf))
    torch.save(saved, folder / "checkpoint.pt")


def test_single_device_run_from_main_resumes(start_server, taps, tmp_path):
    runs = copy_runs(tmp_path, "single")
    saved = checkpoint(runs / "restarted")["progress"]
    server = start_server(runs_dir=str(runs), resume=True)
    device = SimDevice(server.url, SyntheticTask(taps, n_samples=96), run="restarted", device_id="phone", epochs=2,
                       batch_size=8)
    result = device.run()
    assert result.error is None and result.welcome["resume"]["samples_done"] == saved["stream_trained"] == 80
    assert result.done == {"samples_trained": 192, "steps": 24}
    assert len((runs / "restarted" / "metrics.jsonl").read_text().splitlines()) == 24
    if ON_CPU:
        assert_matches_stored(checkpoint(runs / "restarted")["model"], "single")


def test_cached_run_from_main_resumes_in_its_cached_epochs(start_server, taps, tmp_path):
    runs = copy_runs(tmp_path, "cache")
    assert checkpoint(runs / "cached")["progress"]["phase"] == "cache"
    server = start_server(runs_dir=str(runs), resume=True, cache=True)
    device = SimDevice(server.url, SyntheticTask(taps, n_samples=64), run="cached", device_id="phone", epochs=3,
                       batch_size=8)
    result = device.run()
    assert result.welcome["stop_streaming"] and result.samples_sent == 0
    assert result.done == {"samples_trained": 192, "steps": 24}
    if ON_CPU:
        assert_matches_stored(checkpoint(runs / "cached")["model"], "cache")


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(RUNS))
def test_tolerance_covers_measured_rounding(start_server, taps, tmp_path, kind):
    """Here, within one run: the same resume twice is bit-identical; a resume whose every starting
    weight is one ulp off ends within TOLERANCE / 10 of it (TOLERANCE is 40x the drift measured)."""
    first = resume(start_server, taps, tmp_path / "a", kind)
    assert max_difference(first, resume(start_server, taps, tmp_path / "b", kind)) == 0.0
    for seed in range(2):
        off = resume(start_server, taps, tmp_path / f"ulp{seed}", kind, lambda run: one_ulp_off(run, seed))
        assert 0.0 < max_difference(first, off) <= TOLERANCE / 10


@pytest.mark.slow  # federated, like test_federated.py
def test_federated_run_from_main_resumes_every_device(start_server, tmp_path):
    runs = copy_runs(tmp_path, "fed")
    saved = checkpoint(runs / "fed-sst2")["devices"]
    server = start_server(runs_dir=str(runs), resume=True, federated=True, fed=FedConfig(width=32), side=SIDE,
                          bitplan_every=0)
    for i, (taps, layers) in enumerate(FAMILIES):
        result = SimDevice(server.url, SyntheticTask(taps, n_samples=64, seed=i), task="sst2", epochs=2,
                           batch_size=16, device_id=f"d{i}", num_layers=layers).run()
        assert result.error is None and result.welcome["resume"]["samples_done"] == saved[f"d{i}"]["trained"]
        assert result.done["samples_trained"] == 128
    server.stop()
    summary = json.loads((runs / "fed-sst2" / "summary.json").read_text())
    assert len(summary["families"]) == 2 and summary["samples_trained"] == 2 * 128
