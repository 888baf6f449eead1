"""Run folders written before the one training loop (main at d0a0b28; data/make_main_runs.py) still
resume: a restarted server continues each from its checkpoint, at the position it saved, and a
single-device run ends with the very weights the old code reached without interruption."""

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


def copy_runs(tmp_path: Path, kind: str) -> Path:
    shutil.copytree(DATA / kind, tmp_path / kind)
    return tmp_path / kind


def checkpoint(folder: Path) -> dict:
    return torch.load(folder / "checkpoint.pt", map_location="cpu", weights_only=True)


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


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
        assert same(checkpoint(runs / "restarted")["model"], torch.load(DATA / "straight.pt", weights_only=True))


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
        assert same(checkpoint(runs / "cached")["model"],
                    torch.load(DATA / "straight-cached.pt", weights_only=True))


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
