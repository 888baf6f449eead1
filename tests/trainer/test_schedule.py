"""The one training loop and its two strategies, without a server: a single-device run trains its
member's queue, then its cache, then exports; a stop trains what is queued first; the federated
strategy's pick keeps every device within --max-share."""

import asyncio
import json
from dataclasses import replace

import pytest

from mobillm.common.messages import Hello
from mobillm.common.taps import TapSpec
from mobillm.edge_runtime.simulate import SimDevice, SyntheticTask
from mobillm.trainer.config import FedConfig, OptimConfig, RunConfig, ServerConfig, SideConfig
from mobillm.trainer.core import load_checkpoint
from mobillm.trainer.federated import Device, Federated
from mobillm.trainer.run import SingleDevice
from mobillm.trainer.training import Item, TrainingRun


class Recorder:
    """A device session reduced to the `Link` interface: it records what the run tells it."""

    def __init__(self):
        self.credits: list[tuple[int, int]] = []

    def grant_credit(self, seq: int, samples_done: int) -> None:
        self.credits.append((seq, samples_done))

    def post_bitplan(self, plan) -> None:
        pass


def single_run(folder, taps, *, epochs: int, cache: bool, checkpoint=None) -> TrainingRun:
    cfg = RunConfig(run="r", task="synth", task_type="class", num_labels=2, model_id="synthetic",
                    manifest_sha256="0" * 64, device_id="phone", mode="tokens", epochs=epochs, samples_per_epoch=32,
                    taps=[TapSpec(**t) for t in taps], cache=cache,
                    side=SideConfig(bottleneck=8).for_taps([t["hidden"] for t in taps], 2),
                    optim=OptimConfig())
    folder.mkdir(exist_ok=True)
    cfg.save(folder)
    return TrainingRun("r", folder, SingleDevice(cfg, folder, "cpu", 0, checkpoint), queue_size=8,
                       checkpoint_every=100, checkpoint=checkpoint)


def queue_stream(run: TrainingRun, taps, session: Recorder, batches: int) -> None:
    """What `receive` does for valid batches: each arrives in the member's FIFO in order."""
    data = SyntheticTask(taps, n_samples=32)
    member = run.strategy.member
    member.session = session
    for seq in range(batches):
        batch = data.batch(seq, data.order(0)[seq * 8:(seq + 1) * 8], "tokens")
        member.queue.append(Item(batch, 0, session, 0))
        member.accepted += 8


def test_one_member_trains_its_stream_then_its_cache_then_exports(taps, tmp_path):
    run = single_run(tmp_path / "r", taps, epochs=3, cache=True)
    session = Recorder()
    queue_stream(run, taps, session, 4)
    loop = asyncio.new_event_loop()
    try:
        run.start(loop)
        loop.run_until_complete(asyncio.wait_for(run.wait_until(lambda: run.phase in ("finished", "failed")), 60))
        loop.run_until_complete(asyncio.sleep(0))  # the credits the thread delivered last
    finally:
        run.stop()
        loop.close()
    assert run.phase == "finished" and run.samples_trained == 96 and run.step == 12
    assert session.credits == [(seq, seq * 8) for seq in range(4)]  # each credit says where the device resumes
    steps = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [s["source"] for s in steps] == ["stream"] * 4 + ["cache"] * 8
    assert (tmp_path / "r" / "side_network.onnx").is_file()
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["samples_trained"] == 96


def test_stop_trains_the_queued_batches_then_checkpoints(taps, tmp_path):
    run = single_run(tmp_path / "r", taps, epochs=1, cache=False)
    queue_stream(run, taps, Recorder(), 3)
    run.start(asyncio.new_event_loop())
    run.stop()
    saved = load_checkpoint(tmp_path / "r")
    assert saved["progress"]["step"] == 3 and saved["progress"]["stream_trained"] == 24
    assert saved["progress"]["phase"] == "stream"  # the device never sent DONE: it resumes at sample 24
    resumed = single_run(tmp_path / "r", taps, epochs=1, cache=False, checkpoint=saved)
    assert resumed.step == 3 and resumed.strategy.member.trained == 24
    resumed.stop()


@pytest.fixture
def federated(tmp_path, taps):
    hello = Hello.from_meta(SimDevice("ws://unused", SyntheticTask(taps), task="sst2", num_layers=3).hello())
    config = ServerConfig(federated=True, fed=FedConfig(width=32, max_share=0.5, share_window=64))
    strategy = Federated("fed-sst2", tmp_path / "fed", config, hello)

    def device(name: str, trained: int, queued: int, streaming: bool) -> Device:
        dev = Device(name, 128, hello=replace(hello, device_id=name), accepted=trained + 16 * queued)
        dev.session = Recorder() if streaming else None
        dev.queue.extend(Item(SyntheticTask(taps).batch(i, list(range(16)), "tokens"), 0, dev.session, 0)
                         for i in range(queued))
        strategy.window_counts[name] += trained
        strategy.window_total += trained
        return dev

    return strategy, device


def test_federated_pick_serves_the_least_served_device_first(federated):
    strategy, device = federated
    ahead, behind = device("ahead", 48, 1, True), device("behind", 16, 1, True)
    assert strategy.pick([ahead, behind]) is behind


def test_federated_pick_waits_for_a_streaming_device_below_max_share(federated):
    strategy, device = federated
    ahead, waiting = device("ahead", 48, 1, True), device("waiting", 0, 0, True)
    # `ahead` would exceed the cap and `waiting` (below it, still streaming) has nothing queued: wait for it.
    assert strategy.pick([ahead, waiting]) is None
    waiting.session = None  # it left: the cap no longer waits for it
    assert strategy.pick([ahead, waiting]) is ahead
