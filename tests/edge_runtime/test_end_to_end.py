"""End to end: tiny export, real trainer server, edge-run train over WebSocket, model returned,
then edge-run predict/eval agree with the torch side network on the same inputs."""

import json

import numpy as np
import pytest
from helpers import write_rows as write_data

torch = pytest.importorskip("torch", exc_type=ModuleNotFoundError)

from mobillm.common import wire  # noqa: E402
from mobillm.common.netsim import free_port  # noqa: E402
from mobillm.common.tasks import get_task  # noqa: E402
from mobillm.edge_runtime import cli  # noqa: E402
from mobillm.edge_runtime.backbone import Backbone  # noqa: E402
from mobillm.edge_runtime.data import load_examples  # noqa: E402
from mobillm.edge_runtime.predict import JointModel  # noqa: E402
from mobillm.edge_runtime.stream import StreamClient, TrainOptions  # noqa: E402
from mobillm.kernels import torch_codec  # noqa: E402
from mobillm.trainer.config import RunConfig, ServerConfig, SideConfig  # noqa: E402
from mobillm.trainer.core import load_checkpoint  # noqa: E402
from mobillm.trainer.export import export_onnx  # noqa: E402
from mobillm.trainer.model import SideNetwork, build_side_network  # noqa: E402
from mobillm.trainer.server import TrainerServer  # noqa: E402

@pytest.fixture
def server(tmp_path):
    srv = TrainerServer(ServerConfig(host="127.0.0.1", port=0, runs_dir=str(tmp_path / "runs")))
    port = srv.start()
    yield srv, port
    srv.stop()


def torch_logits(model: SideNetwork, bb: Backbone, examples, mode: str = "pooled") -> np.ndarray:
    """The torch side network on the backbone's dequantized rows that `mode` sends (JointModel's inputs):
    the last token (pooled), or the last token and the tokens' mean (summary, read with mean pooling)."""
    rows = [bb.tokenize(e.texts, 128)[0] for e in examples]
    taps, _ = bb.forward(rows, keep=mode)
    decoded = [torch_codec.decode(torch.from_numpy(t.codes), torch.from_numpy(t.scales), t.spec.fmt, t.spec.hidden,
                                  t.spec.block_size) for t in taps]
    per_sample = wire.ROWS_PER_SAMPLE[mode]
    with torch.no_grad():
        return model.logits_from_rows(decoded, torch.full((len(rows),), per_sample, dtype=torch.long)).numpy()


def test_joint_model_runs_a_side_network_with_tap1_adapter(tiny_engine, tmp_path):
    """`--adapter-per-tap` (M taps, M adapters) needs nothing new on the device: its ONNX runs as is."""
    bb = Backbone(tiny_engine)
    cfg = SideConfig(adapter_per_tap=True, bottleneck=8).for_taps([t.hidden for t in bb.manifest.taps], 2)
    model = build_side_network(cfg, seed=3).eval()
    assert len(model.adapters) == len(bb.manifest.taps)
    with torch.no_grad():  # make the adapters matter, as after training
        for adapter in model.adapters:
            adapter.up.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(4))
    side = tmp_path / "side.onnx"
    side.write_bytes(export_onnx(model))
    examples = load_examples(write_data(tmp_path / "dev.tsv", 20, seed=1), get_task("sst2"))
    got = JointModel(bb, side).predict(examples, 128, batch_size=7, progress=False)
    assert np.abs(got - torch_logits(model, bb, examples)).max() < 1e-4


def test_train_then_predict_matches_torch(tiny_engine, tmp_path, server, capsys):
    srv, port = server
    data = write_data(tmp_path / "train.tsv", 96)
    side = tmp_path / "side.onnx"
    rc = cli.main(["train", "--engine", str(tiny_engine), "--data", str(data), "--task", "sst2",
                   "--server", f"ws://127.0.0.1:{port}", "--epochs", "3", "--batch-size", "8", "--run", "e2e",
                   "--side-out", str(side), "--stats-out", str(tmp_path / "stats.json"), "-q"])
    assert rc == 0 and side.is_file()
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["samples_sent"] == 3 * 96 and stats["reconnects"] == 0

    # The torch side network from the server's final checkpoint, fed the same dequantized taps.
    run_dir = tmp_path / "runs" / "e2e"
    cfg = RunConfig.load(run_dir)
    model = SideNetwork(cfg.side)
    model.load_state_dict(load_checkpoint(run_dir, "cpu")["model"])
    model.eval()
    bb = Backbone(tiny_engine)
    joint = JointModel(bb, side)
    examples = load_examples(write_data(tmp_path / "dev.tsv", 20, seed=1), get_task("sst2"))
    got = joint.predict(examples, 128, batch_size=7, progress=False)
    assert joint.mode == "summary" and cfg.mode == "summary" and cfg.side.pooling == "mean"  # the engine's default
    assert np.abs(got - torch_logits(model, bb, examples, "summary")).max() < 1e-4

    # The CLI paths give the same predictions and a metric.
    capsys.readouterr()
    assert cli.main(["eval", "--engine", str(tiny_engine), "--side", str(side), "--data",
                     str(tmp_path / "dev.tsv"), "--task", "sst2", "-q"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["rows"] == 20 and 0.0 <= result["accuracy"] <= 1.0
    assert result["accuracy"] == float(np.mean(got.argmax(-1) == np.array([e.label for e in examples])))
    out = tmp_path / "preds.jsonl"
    assert cli.main(["predict", "--engine", str(tiny_engine), "--side", str(side), "--data",
                     str(tmp_path / "dev.tsv"), "--out", str(out), "-q"]) == 0
    preds = [json.loads(line)["prediction"] for line in out.read_text().splitlines()]
    assert preds == got.argmax(-1).tolist()


def test_frames_carry_no_text_or_token_ids(tiny_engine, tmp_path, server, link_proxy):
    """Capture every byte the device sends: neither the text nor any run of its token ids is in it."""
    srv, port = server
    proxy = link_proxy(port, capture=True)
    data = write_data(tmp_path / "train.tsv", 24)
    bb = Backbone(tiny_engine)
    task = get_task("sst2")
    examples = load_examples(data, task)
    for mode in ("tokens", "pooled"):
        trainer = StreamClient(bb, examples, task, TrainOptions(server=f"ws://127.0.0.1:{proxy.port}", batch_size=8,
                                                               mode=mode, run=f"privacy-{mode}", progress=False))
        trainer.run()
        assert trainer.model_bytes
    blob = bytes(proxy.captured)
    assert len(blob) > 10_000
    for ex in examples:
        assert ex.texts[0].encode() not in blob
        ids = bb.tokenize(ex.texts, 128)[0]
        for width in ("<i8", "<i4", "<u2"):
            assert ids[1:4].astype(width).tobytes() not in blob
    for word in ("superb", "boring", "movie"):
        assert word.encode() not in blob


@pytest.mark.slow
def test_unreachable_server_is_a_one_line_error(tiny_engine, tmp_path, capsys):
    port = free_port()  # free a moment ago: nothing listens there
    data = write_data(tmp_path / "train.tsv", 8)
    rc = cli.main(["train", "--engine", str(tiny_engine), "--data", str(data), "--server", f"ws://127.0.0.1:{port}",
                   "-q", "--batch-size", "4"] + ["--epochs", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("edge-run: error: cannot reach the server")


def test_bad_engine_and_data_errors(tiny_engine, tmp_path, capsys):
    rc = cli.main(["train", "--engine", str(tmp_path / "missing"), "--data", "x.tsv"])
    assert rc == 2 and "engine folder not found" in capsys.readouterr().err
    empty = tmp_path / "empty.tsv"
    empty.write_text("")
    rc = cli.main(["train", "--engine", str(tiny_engine), "--data", str(empty)])
    assert rc == 2 and "no rows found" in capsys.readouterr().err
    wrong = tmp_path / "wrong.tsv"
    wrong.write_text("sentence\tlabel\nfine\t3\n")
    rc = cli.main(["train", "--engine", str(tiny_engine), "--data", str(wrong), "--task", "sst2"])
    assert rc == 2 and "outside 0..1" in capsys.readouterr().err


def test_checksum_mismatch_is_refused(tiny_engine, tmp_path, capsys):
    import shutil

    copy = tmp_path / "engine"
    shutil.copytree(tiny_engine, copy)
    tok = next((copy / "tokenizer").iterdir())
    tok.write_bytes(tok.read_bytes() + b" ")
    rc = cli.main(["predict", "--engine", str(copy), "--side", str(tmp_path / "s.onnx"), "hello"])
    assert rc == 2 and "checksum mismatch" in capsys.readouterr().err
