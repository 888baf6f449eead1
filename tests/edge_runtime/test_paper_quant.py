"""The paper's quantization options end to end: an fp4 engine with per-tensor scales
(`export-backbone --quant fp4 --block-size 0`) and `edge-run --bits fp4`, each training against
a real trainer server on 127.0.0.1."""

import json

import pytest
from helpers import write_rows as write_data

pytest.importorskip("torch", exc_type=ModuleNotFoundError)

from mobillm.common.messages import allowed_formats  # noqa: E402
from mobillm.edge_runtime import cli  # noqa: E402
from mobillm.edge_runtime.backbone import Backbone  # noqa: E402
from mobillm.kernels import codec  # noqa: E402
from mobillm.trainer.config import RunConfig, ServerConfig  # noqa: E402
from mobillm.trainer.server import TrainerServer  # noqa: E402


@pytest.fixture
def server(tmp_path):
    srv = TrainerServer(ServerConfig(host="127.0.0.1", port=0, runs_dir=str(tmp_path / "runs")))
    port = srv.start()
    yield port
    srv.stop()


def train(engine, tmp_path, port, run, *extra) -> dict:
    data = write_data(tmp_path / "train.tsv", 32)
    stats = tmp_path / f"{run}.json"
    rc = cli.main(["train", "--engine", str(engine), "--data", str(data), "--task", "sst2", "--server",
                   f"ws://127.0.0.1:{port}", "--batch-size", "8", "--run", run, "--stats-out", str(stats), "-q",
                   *extra])
    assert rc == 0
    return json.loads(stats.read_text())


@pytest.mark.slow  # exports its own engine (~6 s)
def test_fp4_per_tensor_engine_trains(tiny_engine_factory, tmp_path, server):
    engine = tiny_engine_factory(quant="fp4", block_size=codec.PER_TENSOR)
    bb = Backbone(engine)
    assert {(t.fmt, t.block_size) for t in bb.manifest.taps} == {("fp4", 0)}
    rows = [bb.tokenize(("a fine film",), 32)[0], bb.tokenize(("dull and long, far too long",), 32)[0]]
    taps, _ = bb.forward(rows, keep="tokens")
    for tap in taps:  # one scale per tap tensor (the rows sent), repeated per row; fp4 nibbles packed
        assert tap.scales.shape == (sum(map(len, rows)), 1) and (tap.scales == tap.scales[0, 0]).all()
        assert tap.codes.shape[-1] == codec.code_bytes("fp4", tap.spec.hidden)
    stats = train(engine, tmp_path, server, "fp4-tensor", "--send", "tokens")
    assert stats["samples_sent"] == 32
    cfg = RunConfig.load(tmp_path / "runs" / "fp4-tensor")
    assert {(t.fmt, t.block_size) for t in cfg.taps} == {("fp4", 0)}


def test_edge_run_bits_fp4(tiny_engine, tmp_path, server):
    stats = train(tiny_engine, tmp_path, server, "bits-fp4", "--bits", "fp4")
    assert stats["samples_sent"] == 32
    # The server held every BATCH to the HELLO's bits (trainer/protocol.check_batch): all fp4.
    cfg = RunConfig.load(tmp_path / "runs" / "bits-fp4")
    assert cfg.bits == "fp4" and allowed_formats([t.fmt for t in cfg.taps], cfg.bits) == ["fp4"] * len(cfg.taps)
