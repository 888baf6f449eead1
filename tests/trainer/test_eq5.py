"""MobiLLM Eq. 5 checked by hand: a plain-torch reference (explicit matmuls, the LayerNorm formula,
one token at a time) against SideNetwork, with and without tap 1's own adapter, both poolings;
and the option's adapter count, MODEL meta and ONNX export."""

import math
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from mobillm.common.messages import side_input_names
from mobillm.edge_runtime.simulate import SimDevice, SyntheticTask
from mobillm.trainer.config import RunConfig, SideConfig
from mobillm.trainer.export import check_onnx, export_onnx, random_inputs
from mobillm.trainer.fed_model import SharedSide
from mobillm.trainer.model import SideNetwork

WIDTHS = [16, 16, 24]  # the last tap is wider than the side width: it gets a projection


def reference_logits(taps, mask, w, adapter_per_tap, pooling, eps=1e-5):
    """s_{l+1} = LN(A(s_l + b_{l+1}) + s_l + b_{l+1}) from s_0 = 0 (adapter_per_tap) or s_1 = b_1;
    logits = head(pool(b_M + s_M))."""
    out = []
    for i in range(mask.shape[0]):
        real = [t for t in range(mask.shape[1]) if mask[i, t] > 0]
        feats = []
        for t in (real[-1:] if pooling == "last" else real):
            b = [x[i, t] @ w[f"projections.{k}.weight"].T + w[f"projections.{k}.bias"]
                 if f"projections.{k}.weight" in w else x[i, t] for k, x in enumerate(taps)]
            s, rest = (torch.zeros_like(b[0]), b) if adapter_per_tap else (b[0], b[1:])
            for j, b_next in enumerate(rest):
                x = s + b_next
                a = torch.relu(x @ w[f"adapters.{j}.down.weight"].T + w[f"adapters.{j}.down.bias"])
                h = a @ w[f"adapters.{j}.up.weight"].T + w[f"adapters.{j}.up.bias"] + x
                s = (h - h.mean()) / torch.sqrt(((h - h.mean()) ** 2).mean() + eps) * w[f"norms.{j}.weight"] \
                    + w[f"norms.{j}.bias"]
            feats.append(b[-1] + s)
        out.append(torch.stack(feats).mean(0) @ w["head.weight"].T + w["head.bias"])
    return torch.stack(out)


def side_network(adapter_per_tap: bool, pooling: str = "last", seed: int = 0) -> SideNetwork:
    """A float64 side network whose every weight (LayerNorm gains and biases too) is random and O(1)."""
    cfg = SideConfig(bottleneck=8, pooling=pooling, adapter_per_tap=adapter_per_tap).for_taps(WIDTHS, 3)
    model = SideNetwork(cfg).double().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * (p.shape[-1] ** -0.5 if p.dim() == 2 else 0.5))
    return model


@pytest.mark.parametrize("pooling", ["last", "mean"])
@pytest.mark.parametrize("adapter_per_tap", [False, True])
def test_side_network_is_eq5(adapter_per_tap, pooling):
    model = side_network(adapter_per_tap, pooling)
    assert len(model.adapters) == len(model.norms) == len(WIDTHS) - (not adapter_per_tap)
    g = torch.Generator().manual_seed(1)
    taps = [torch.randn(3, 5, h, generator=g, dtype=torch.float64) for h in WIDTHS]
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [0, 0, 1, 1, 1]], dtype=torch.float64)  # ragged, left pad
    weights = {k: v.detach() for k, v in model.state_dict().items()}
    want = reference_logits(taps, mask, weights, adapter_per_tap, pooling)
    with torch.no_grad():
        got = model(*taps, mask)
    assert got.shape == (3, 3)
    assert torch.allclose(got, want, rtol=0, atol=1e-12), (got - want).abs().max()


def test_the_two_readings_differ():
    """The option is not a no-op: the per-tap network computes other logits."""
    base, per_tap = side_network(False), side_network(True)
    feeds = random_inputs(WIDTHS, batch=2, tokens=3)
    inputs = [torch.from_numpy(feeds[n]).double() for n in side_input_names(len(WIDTHS))]
    with torch.no_grad():
        assert not torch.allclose(base(*inputs), per_tap(*inputs))


def test_federated_body_has_one_adapter_per_slot():
    cfg = SideConfig(bottleneck=4, side_width=8, out_dim=2)
    assert len(SharedSide(cfg, 4).adapters) == 3
    per_slot = SharedSide(SideConfig(bottleneck=4, side_width=8, out_dim=2, adapter_per_tap=True), 4)
    assert len(per_slot.adapters) == len(per_slot.norms) == 4
    b = [torch.randn(2, 8), None, torch.randn(2, 8), torch.randn(2, 8)]  # an empty slot is skipped
    assert torch.isfinite(per_slot.features(b)).all()


def test_model_meta_carries_the_option_only_when_set():
    assert "adapter_per_tap" not in SideConfig().to_meta()  # old frames stay byte-identical
    assert SideConfig(adapter_per_tap=True).to_meta()["adapter_per_tap"] is True


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_onnx_export_with_tap1_adapter_matches_torch(pooling):
    model = side_network(True, pooling).float()
    onnx_bytes = export_onnx(model)
    assert check_onnx(onnx_bytes, model) < 1e-4
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    feeds = random_inputs(WIDTHS, batch=3, tokens=6, seed=5)
    with torch.no_grad():
        want = model(*(torch.from_numpy(feeds[n]) for n in side_input_names(len(WIDTHS)))).numpy()
    got = session.run(["logits"], feeds)[0]
    assert np.abs(got - want).max() < 1e-4 and math.isfinite(float(got.sum()))


def test_served_run_with_tap1_adapter_returns_a_matching_onnx(start_server, taps):
    """A run trained with --adapter-per-tap: the saved config, the checkpoint and the MODEL agree, and
    the ONNX the device runs (JointModel feeds it as is) matches torch."""
    server = start_server(side=SideConfig(adapter_per_tap=True, bottleneck=8))
    result = SimDevice(server.url, SyntheticTask(taps, n_samples=16), epochs=1, batch_size=16).run()
    assert result.error is None
    assert result.model_meta["config"]["adapter_per_tap"] is True
    assert result.model_meta["metrics"]["onnx_max_abs_diff"] < 1e-4
    folder = Path(server.config.runs_dir) / result.welcome["run"]
    cfg = RunConfig.load(folder).side
    assert cfg.adapter_per_tap
    state = torch.load(folder / "checkpoint.pt", map_location="cpu", weights_only=True)["model"]
    assert {k.split(".")[1] for k in state if k.startswith("adapters.")} == {"0", "1", "2"}  # 3 taps, 3 adapters
    model = SideNetwork(cfg)
    model.load_state_dict(state)
    assert check_onnx(result.model, model.eval()) < 1e-4
