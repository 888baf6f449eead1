"""--input-norm channel: the side network standardizes each tap channel by statistics of its first
training rows, frozen after them, kept in the checkpoint and baked into the exported ONNX."""

import numpy as np
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch", exc_type=ModuleNotFoundError)

from mobillm.common.messages import SIDE_MASK, SIDE_OUTPUT, side_input_names  # noqa: E402
from mobillm.trainer.config import ConfigError, ServerConfig, SideConfig  # noqa: E402
from mobillm.trainer.export import export_onnx  # noqa: E402
from mobillm.trainer.model import SideNetwork, build_side_network  # noqa: E402


def taps(n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # One channel 1e4 x the others, as Gemma's residual stream has: standardized, it no longer dominates.
    scale = torch.ones(16)
    scale[3] = 1e4
    return [torch.randn(n, 16, generator=g) * scale + 2.0, torch.randn(n, 8, generator=g) - 1.0]


def test_statistics_of_the_first_rows_then_frozen_and_kept_in_the_checkpoint():
    cfg = SideConfig(input_norm="channel", stats_rows=300, bottleneck=4).for_taps([16, 8], 2)
    model = build_side_network(cfg, seed=0).train()
    first, later = taps(200, 1), taps(200, 2)
    ones = torch.ones(200, dtype=torch.long)
    model.logits_from_rows(first, ones)
    model.logits_from_rows(later, ones)  # only its first 100 rows count: 300 in all
    seen = torch.cat([first[0], later[0][:100]]).double()
    assert int(model.standardize.seen) == 300
    assert torch.allclose(model.standardize.mean0.double(), seen.mean(0), rtol=1e-5, atol=1e-4)
    assert torch.allclose(model.standardize.std0.double(), seen.std(0, unbiased=False), rtol=1e-4)
    frozen = model.standardize.mean0.clone()
    model.logits_from_rows([t * 3 for t in taps(200, 3)], ones)
    assert torch.equal(model.standardize.mean0, frozen)
    out = model.standardize([first[0][:5], first[1][:5]])[0]
    assert out[:, 3].abs().max() < 10  # the 1e4 channel now sits at the others' scale

    again = SideNetwork(cfg)
    again.load_state_dict(model.state_dict())  # the checkpoint carries the statistics
    assert torch.equal(again.standardize.mean0, frozen) and int(again.standardize.seen) == 300


def test_the_exported_onnx_applies_the_same_standardization():
    cfg = SideConfig(input_norm="channel", stats_rows=100, bottleneck=4, pooling="mean").for_taps([16, 8], 2)
    model = build_side_network(cfg, seed=0).train()
    model.logits_from_rows(taps(100, 1), torch.ones(100, dtype=torch.long))
    model.eval()
    sess = ort.InferenceSession(export_onnx(model), providers=["CPUExecutionProvider"])
    x = taps(6, 5)
    feeds = {name: t.reshape(3, 2, -1).numpy() for name, t in zip(side_input_names(2)[:-1], x)}
    feeds[SIDE_MASK] = np.ones((3, 2), np.float32)
    got = sess.run([SIDE_OUTPUT], feeds)[0]
    with torch.no_grad():
        want = model.logits_from_rows(x, torch.full((3,), 2, dtype=torch.long)).numpy()
    assert np.abs(got - want).max() < 1e-4


def test_old_configs_keep_their_meta_and_federated_refuses_it():
    assert "input_norm" not in SideConfig().to_meta()  # MODEL frames of runs without it stay byte-identical
    with pytest.raises(ConfigError, match="single-device"):
        ServerConfig(federated=True, side=SideConfig(input_norm="channel")).validate()


def test_a_last_token_head_reads_the_first_row_of_each_summary_sample():
    from mobillm.common import wire
    from mobillm.kernels import codec
    from mobillm.trainer.data import rows_for_model

    values = np.arange(6 * 32, dtype=np.float32).reshape(6, 32)  # 3 samples x (last token, mean)
    enc = codec.encode(values, "fp16", 32)
    tap = wire.TapPayload("fp16", 32, 32, enc.codes, enc.scales, 0)
    batch = wire.Batch(1, np.array([7, 8, 9], np.uint64), np.array([0, 1, 0]), np.full(3, 2, np.uint32), [tap],
                       "summary")
    last = rows_for_model(batch, "last")
    assert list(last.lengths) == [1, 1, 1]
    assert np.array_equal(last.codes[0], enc.codes[[0, 2, 4]])  # each sample's last token, not its mean row
    mean = rows_for_model(batch, "mean")
    assert list(mean.lengths) == [2, 2, 2] and np.array_equal(mean.codes[0], enc.codes)
