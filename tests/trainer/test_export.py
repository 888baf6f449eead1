"""The MODEL a device receives: ONNX Runtime on dequantized, padded taps == torch == the training path."""

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from mobillm.common.taps import TapSpec
from mobillm.edge_runtime.simulate import SimDevice, SyntheticTask
from mobillm.trainer import cli
from mobillm.trainer.config import RunConfig, SideConfig
from mobillm.trainer.core import step_loss
from mobillm.trainer.data import rows_for_model
from mobillm.trainer.model import SideNetwork


def padded(batch, left=False):
    """What the device feeds the side network: reference-codec dequantized taps, padded, plus the mask."""
    lengths = batch.lengths.astype(np.int64)
    width = int(lengths.max())
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    feeds = {"mask": np.zeros((len(lengths), width), np.float32)}
    for i, tap in enumerate(batch.taps):
        x, out = tap.decode(), np.zeros((len(lengths), width, tap.hidden), np.float32)
        for r, (s, n) in enumerate(zip(starts, lengths)):
            cols = slice(width - n, width) if left else slice(0, n)
            out[r, cols] = x[s:s + n]
            feeds["mask"][r, cols] = 1
        feeds[f"tap{i}"] = out
    return feeds


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_received_onnx_matches_torch_and_training(start_server, taps, pooling):
    server = start_server(side=SideConfig(pooling=pooling))
    data = SyntheticTask(taps, n_samples=64, num_labels=3)
    result = SimDevice(server.url, data, epochs=1, batch_size=16).run()
    meta = result.model_meta
    assert meta["inputs"] == ["tap0", "tap1", "tap2", "mask"] and meta["output"] == "logits"
    assert meta["metrics"]["onnx_max_abs_diff"] < 1e-4
    session = ort.InferenceSession(result.model, providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == meta["inputs"]

    folder = Path(server.config.runs_dir) / result.welcome["run"]
    model = SideNetwork(RunConfig.load(folder).side)
    model.load_state_dict(torch.load(folder / "checkpoint.pt", map_location="cpu", weights_only=True)["model"])
    model.eval()
    for n, left in ((7, False), (3, True), (1, False)):  # dynamic batch and token axes, either padding side
        batch = data.batch(0, np.arange(10, 10 + n), "tokens")
        feeds = padded(batch, left)
        got = session.run(["logits"], feeds)[0]
        assert got.shape == (n, 3)
        with torch.no_grad():
            graph = model(*(torch.from_numpy(feeds[k]) for k in meta["inputs"])).numpy()
            _, trained, _ = step_loss(model, rows_for_model(batch, pooling), [TapSpec(**t) for t in taps], "class",
                                      torch.device("cpu"))
        assert np.abs(got - graph).max() < 1e-4
        assert np.abs(got - trained.numpy()).max() < 1e-4


def test_cli_export_and_plot(start_server, taps, capsys):
    server = start_server()
    result = SimDevice(server.url, SyntheticTask(taps, n_samples=32), epochs=2, batch_size=8).run()
    folder = Path(server.config.runs_dir) / result.welcome["run"]
    (folder / "side_network.onnx").unlink()
    assert cli.main(["export", str(folder)]) == 0
    assert "max |onnx - torch|" in capsys.readouterr().out
    assert (folder / "side_network.onnx").read_bytes() == result.model
    assert cli.main(["plot", result.welcome["run"], "--runs", server.config.runs_dir]) == 0
    png = (folder / "loss.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
