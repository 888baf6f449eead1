"""The real device path learns, and the labels it sends are its rows'.

* `edge-run train` (its real StreamClient) against a real `trainer serve` process on 127.0.0.1
  learns the synthetic sentiment sample: the joint model it gets back scores >= 0.8 on held-out
  rows with `edge-run eval` (chance is 0.5).
* Every BATCH frame the device sends, captured by a WebSocket relay between device and server and
  read with the project's own decoder (common/wire.py), carries for each of its rows the label
  and the token count of the file row its sample id names: a label/row mix-up on the device
  cannot pass.
"""

from __future__ import annotations

import asyncio
import json
import threading

import numpy as np
import pytest
from helpers import write_rows

from mobillm.bench.server import TrainerServe
from mobillm.common import wire
from mobillm.common.tasks import get_task
from mobillm.edge_runtime import cli
from mobillm.edge_runtime.backbone import Backbone
from mobillm.edge_runtime.data import load_examples
from mobillm.edge_runtime.stream import StreamClient, TrainOptions

pytest.importorskip("torch", exc_type=ModuleNotFoundError)  # the server's (the tiny engine's export needs it too)


@pytest.fixture(scope="module")
def trainer_serve(tmp_path_factory):
    """A `trainer serve` process on a free port of 127.0.0.1 (one for this module, each test its own
    run); yields its ws:// URL; stopped with SIGTERM, which it must answer with exit status 0."""
    tmp_path = tmp_path_factory.mktemp("serve")
    with TrainerServe(tmp_path / "runs", "--threads", "1", "--no-tensorboard", "--bitplan-every", "0",
                      log=tmp_path / "server.log") as server:
        yield server.url
        assert server.stop(60) == 0, (tmp_path / "server.log").read_text()[-2000:]


def test_edge_run_train_learns_the_sample(tiny_engine, trainer_serve, tmp_path, capsys):
    train = write_rows(tmp_path / "train.tsv", 256, seed=0)
    dev = write_rows(tmp_path / "dev.tsv", 64, seed=1)  # other rows than the training ones
    side = tmp_path / "side.onnx"
    assert cli.main(["train", "--engine", str(tiny_engine), "--data", str(train), "--task", "sst2",
                     "--server", trainer_serve, "--epochs", "10", "--batch-size", "16", "--run", "learns",
                     "--side-out", str(side), "-q"]) == 0
    capsys.readouterr()
    assert cli.main(["eval", "--engine", str(tiny_engine), "--side", str(side), "--data", str(dev),
                     "--task", "sst2", "-q"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["rows"] == 64
    assert result["accuracy"] >= 0.8, result


class BatchRelay:
    """A WebSocket relay on 127.0.0.1 that forwards every message both ways, unchanged, and keeps the
    device's BATCH frames, decoded with common/wire.py. Runs its own event loop in a thread."""

    def __init__(self, target: str):
        self.target = target
        self.batches: list[wire.Batch] = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def start(self) -> str:
        import websockets

        self.thread.start()

        async def serve():
            return await websockets.serve(self.handle, "127.0.0.1", 0, max_size=None)

        self.server = asyncio.run_coroutine_threadsafe(serve(), self.loop).result(10)
        return f"ws://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def handle(self, device):
        import websockets

        async with websockets.connect(self.target, max_size=None) as server:
            async def up():
                async for msg in device:
                    frame = wire.decode_frame(msg)
                    if frame.type == wire.MsgType.BATCH:
                        self.batches.append(wire.Batch.from_body(frame.body))
                    await server.send(msg)
                await server.close()

            async def down():
                async for msg in server:
                    await device.send(msg)
                await device.close()

            await asyncio.gather(up(), down(), return_exceptions=True)

    def stop(self) -> None:
        self.server.close()
        asyncio.run_coroutine_threadsafe(self.server.wait_closed(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.mark.parametrize("mode", ["tokens", "pooled"])
def test_every_batch_label_is_its_rows_label(tiny_engine, trainer_serve, tmp_path, mode):
    # Labels drawn at random (not alternating), distinct texts of varied lengths: a shifted,
    # reordered or repeated label would disagree with its row somewhere.
    data = write_rows(tmp_path / "train.tsv", 77, seed=5, balanced=False, numbered=True, adjectives=(1, 9))
    task = get_task("sst2")
    examples = load_examples(data, task)
    rows = [line.split("\t") for line in data.read_text().splitlines()[1:]]
    file_labels = np.array([int(label) for _, label in rows])
    assert 20 < file_labels.sum() < 57  # both labels, in no fixed pattern
    bb = Backbone(tiny_engine)
    lengths = np.array([len(bb.tokenize(ex.texts, 128)[0]) for ex in examples])

    relay = BatchRelay(trainer_serve)
    url = relay.start()
    try:
        client = StreamClient(bb, examples, task, TrainOptions(server=url, batch_size=8, epochs=2, mode=mode,
                                                               run=f"labels-{mode}", progress=False))
        client.run()
        assert client.model_bytes
    finally:
        relay.stop()

    ids = np.concatenate([b.sample_ids for b in relay.batches]).astype(np.int64)
    assert sorted(ids.tolist()) == sorted(list(range(len(rows))) * 2)  # every row, once per epoch
    for b in relay.batches:
        assert b.mode == mode
        ids = b.sample_ids.astype(np.int64)
        assert b.labels.tolist() == file_labels[ids].tolist(), f"batch {b.seq}: labels are not its rows'"
        if mode == "tokens":  # the taps of each row are as long as that row's tokens
            assert b.lengths.tolist() == lengths[ids].tolist(), f"batch {b.seq}: lengths are not its rows'"
