"""`--profile paper` on both sides (explicit flags win), the CPU fallback from fp16, and the
mixed-precision training step (bf16 autocast on the CPU; loss scaling leaves a step unchanged)."""

from pathlib import Path

import numpy as np
import pytest
import torch

from mobillm.common.taps import TapSpec
from mobillm.common.profiles import PROFILES, parse_with_profile
from mobillm.edge_runtime import cli as edge_cli
from mobillm.edge_runtime.simulate import SimDevice, SyntheticTask
from mobillm.trainer import cli
from mobillm.trainer.config import OptimConfig, RunConfig, ServerConfig, SideConfig
from mobillm.trainer.core import MixedPrecision, make_optimizer, resolve_precision, train_step
from mobillm.trainer.data import rows_for_model
from mobillm.trainer.model import build_side_network

CPU = torch.device("cpu")


def serve_config(*argv) -> ServerConfig:
    return cli.server_config(parse_with_profile(cli.build_parser, ["serve", *argv], "trainer"))


def test_paper_profile_on_a_cpu_server_says_one_line_and_trains_fp32(capsys):
    config = serve_config("--profile", "paper")
    assert config.optim.lr == 5e-4
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["trainer: fp16 training needs a CUDA server; --device cpu trains in fp32 instead"]
    assert config.optim.precision == "fp32"  # what the runs record and train in
    assert config.side == SideConfig() and config.port == ServerConfig().port  # nothing else changes


def test_explicit_flags_override_the_profile(capsys):
    config = serve_config("--profile", "paper", "--lr", "1e-3", "--precision", "bf16")
    assert (config.optim.lr, config.optim.precision) == (1e-3, "bf16")
    assert capsys.readouterr().err == ""
    assert serve_config() == ServerConfig()  # no profile: the dataclass defaults


def test_device_side_of_the_paper_profile():
    base = ["--engine", "e", "--data", "d.tsv"]
    args = parse_with_profile(edge_cli.build_parser, ["train", *base, "--profile", "paper"], "device")
    assert (args.batch_size, args.max_len, args.epochs) == (16, 256, 20)
    args = parse_with_profile(edge_cli.build_parser, ["train", *base, "--profile", "paper", "--epochs", "2"], "device")
    assert (args.batch_size, args.max_len, args.epochs) == (16, 256, 2)
    args = parse_with_profile(edge_cli.build_parser, ["eval", "--engine", "e", "--side", "s.onnx", "--data", "d",
                                                      "--profile", "paper"], "device")
    assert (args.batch_size, args.max_len) == (16, 256)  # eval batches as the profile trains
    assert set(PROFILES["paper"].device) <= set(vars(parse_with_profile(edge_cli.build_parser, ["train", *base],
                                                                        "device")))


def test_unknown_profile_exits_2(capsys):
    with pytest.raises(SystemExit) as exc:
        parse_with_profile(cli.build_parser, ["serve", "--profile", "nope"], "trainer")
    assert exc.value.code == 2 and "invalid choice: 'nope'" in capsys.readouterr().err


def test_precision_resolution():
    assert resolve_precision("fp16", "cpu")[0] == "fp32"
    assert resolve_precision("bf16", "cpu") == ("bf16", None)
    assert resolve_precision("fp32", "cuda") == ("fp32", None)
    amp = MixedPrecision("fp16", CPU)  # a run built without the CLI falls back too, never fails mid-run
    assert amp.precision == "fp32" and not amp.scaler.is_enabled()


def batch_rows(taps, n=8):
    data = SyntheticTask(taps, n_samples=n, num_labels=2)
    return rows_for_model(data.batch(0, np.arange(n), "tokens"), "last"), [TapSpec(**t) for t in taps]


def one_step(taps, amp, seed=0):
    rows, infos = batch_rows(taps)
    model = build_side_network(SideConfig(bottleneck=8).for_taps([t["hidden"] for t in taps], 2), seed)
    optimizer = make_optimizer(model, ServerConfig().optim)
    step = train_step(model, optimizer, rows, infos, "class", CPU, lambda _: 1e-2, 1.0, True, amp)
    return model, step


def test_bf16_autocast_step_on_cpu(taps):
    ref_model, ref = one_step(taps, None)
    model, step = one_step(taps, MixedPrecision("bf16", CPU))
    assert np.isfinite(step.loss) and abs(step.loss - ref.loss) < 0.05
    assert step.logits.dtype == torch.float32  # callers turn logits into numpy
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in step.inputs)
    moved = [not torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref_model.state_dict().values())]
    assert any(moved)  # the bf16 step computed (slightly) different updates, so autocast was on


def test_loss_scaling_leaves_the_step_unchanged(taps):
    """The fp16 path's GradScaler (run here without fp16 autocast, which needs CUDA): a power-of-two
    scale, unscaled before clipping and for the per-tap importance, gives fp32's step exactly."""
    ref_model, ref = one_step(taps, None)
    amp = MixedPrecision("fp32", CPU)
    amp.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    model, step = one_step(taps, amp)
    assert step.loss == ref.loss and step.grad_norm == pytest.approx(ref.grad_norm, rel=1e-6)
    for got, want in zip(step.inputs, ref.inputs):
        assert torch.allclose(got.grad, want.grad, rtol=1e-6, atol=0)
    for got, want in zip(model.state_dict().values(), ref_model.state_dict().values()):
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-9)
    assert amp.save_to({})["scaler"]["scale"] == 1024.0  # fp16 checkpoints keep the loss scale
    assert "scaler" not in MixedPrecision("fp32", CPU).save_to({})  # fp32 checkpoints keep their layout


def test_a_bf16_run_trains_to_the_end_and_records_its_precision(start_server, taps):
    server = start_server(optim=OptimConfig(precision="bf16"))
    result = SimDevice(server.url, SyntheticTask(taps, n_samples=32), epochs=2, batch_size=16).run()
    assert result.error is None and result.done == {"samples_trained": 64, "steps": 4}
    folder = Path(server.config.runs_dir) / result.welcome["run"]
    assert RunConfig.load(folder).optim.precision == "bf16"
    assert result.model_meta["metrics"]["onnx_max_abs_diff"] < 1e-4  # exported in fp32 as always
