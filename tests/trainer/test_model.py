"""The side network: per-token by construction, so pooled mode is exact; graph form = training form."""

import numpy as np
import pytest
import torch

from mobillm.common import wire
from mobillm.common.taps import TapSpec
from mobillm.edge_runtime.simulate import SyntheticTask
from mobillm.trainer.config import SideConfig
from mobillm.trainer.core import step_loss
from mobillm.trainer.data import rows_for_model
from mobillm.trainer.model import build_side_network

CPU = torch.device("cpu")


def model_for(taps, pooling="last", activation="relu", out_dim=3, seed=0):
    cfg = SideConfig(pooling=pooling, activation=activation, bottleneck=8)
    cfg = cfg.for_taps([t["hidden"] for t in taps], out_dim)
    model = build_side_network(cfg, seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # make the adapters matter, as after some training
        for adapter in model.adapters:
            adapter.up.weight.normal_(0, 0.1, generator=g)
    return model


def over_the_wire(batch: wire.Batch) -> wire.Batch:
    return wire.Batch.from_body(wire.decode_frame(wire.batch_frame(batch)).body)


def test_structure_and_init(taps):
    model = build_side_network(SideConfig().for_taps([32, 32, 16], 2), seed=0)
    assert model.cfg.side_width == 32
    assert [type(p).__name__ for p in model.projections] == ["Identity", "Identity", "Linear"]
    assert len(model.adapters) == len(model.norms) == 2  # tap 1 seeds the state; taps 2..M own an adapter
    assert model.adapters[0].up.weight.abs().max() < 1e-3  # W_up near zero: starts as a residual
    assert 0.01 < model.adapters[0].down.weight.std() < 0.03
    again = build_side_network(SideConfig().for_taps([32, 32, 16], 2), seed=0)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_side_network_never_mixes_tokens(taps):
    model = model_for(taps)
    rows = [torch.randn(11, t["hidden"]) for t in taps]
    pick = torch.tensor([3, 7, 10])
    with torch.no_grad():
        assert torch.allclose(model.features(rows)[pick], model.features([r[pick] for r in rows]), atol=1e-6)


@pytest.mark.parametrize("task_type", ["class", "regression"])
def test_tokens_and_pooled_modes_give_same_loss_and_grads(taps, task_type):
    data = SyntheticTask(taps, n_samples=32, task_type=task_type, num_labels=3)
    ids = np.arange(12)
    tokens = over_the_wire(data.batch(0, ids, "tokens"))
    pooled = over_the_wire(data.batch(0, ids, "pooled"))
    assert tokens.n_tokens > pooled.n_tokens == len(ids)
    info = [TapSpec(**t) for t in taps]
    results = []
    for batch in (tokens, pooled):
        model = model_for(taps, out_dim=1 if task_type == "regression" else 3)
        loss, _, _ = step_loss(model, rows_for_model(batch, "last"), info, task_type, CPU)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss_t, grads_t), (loss_p, grads_p) = results
    assert torch.equal(loss_t, loss_p)
    assert grads_t.keys() == grads_p.keys()
    assert all(torch.equal(grads_t[n], grads_p[n]) for n in grads_t)


@pytest.mark.parametrize("pooling,activation", [("last", "relu"), ("mean", "gelu")])
def test_graph_form_matches_training_form(taps, pooling, activation):
    """forward(padded taps, mask) == logits_from_rows(packed rows), left or right padding."""
    model = model_for(taps, pooling, activation).eval()
    data = SyntheticTask(taps, n_samples=8)
    batch = data.batch(0, np.arange(5), "tokens")
    lengths = batch.lengths.astype(np.int64)
    with torch.no_grad():
        rows = rows_for_model(batch, pooling)
        inputs = [torch.from_numpy(decode_tap(batch, rows, i)) for i in range(len(taps))]
        want = model.logits_from_rows(inputs, torch.from_numpy(rows.lengths))
        for left in (False, True):
            padded, mask = pad(batch, left)
            got = model(*[torch.from_numpy(p) for p in padded], torch.from_numpy(mask))
            assert torch.allclose(got, want, atol=1e-5), (left, (got - want).abs().max())
    assert lengths.min() < lengths.max()  # the padding was really ragged


def decode_tap(batch, rows, i):
    """Reference-codec decode of tap i of the selected rows."""
    t = batch.taps[i]
    return wire.TapPayload(t.fmt, t.block_size, t.hidden, rows.codes[i], rows.scales[i], i).decode()


def pad(batch: wire.Batch, left: bool):
    """Dequantized taps padded to [B, T, H] (reference codec) and the mask, as the device builds them."""
    lengths = batch.lengths.astype(np.int64)
    width = int(lengths.max())
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    mask = np.zeros((len(lengths), width), np.float32)
    padded = []
    for tap in batch.taps:
        x = tap.decode()
        out = np.zeros((len(lengths), width, tap.hidden), np.float32)
        for i, (s, n) in enumerate(zip(starts, lengths)):
            cols = slice(width - n, width) if left else slice(0, n)
            out[i, cols] = x[s:s + n]
            mask[i, cols] = 1
        padded.append(out)
    return padded, mask
