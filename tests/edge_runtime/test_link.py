"""The device on a bad link: dropped connections resume without loss; bits adapt to the uplink."""

import threading
import time

import numpy as np
import pytest

pytest.importorskip("torch", exc_type=ModuleNotFoundError)

from mobillm.common.tasks import get_task  # noqa: E402
from mobillm.edge_runtime.backbone import Backbone  # noqa: E402
from mobillm.edge_runtime.data import load_examples  # noqa: E402
from mobillm.edge_runtime.stream import StreamClient, TrainOptions  # noqa: E402
from mobillm.trainer.config import ServerConfig  # noqa: E402
from mobillm.trainer.server import TrainerServer  # noqa: E402

pytestmark = pytest.mark.slow  # real servers, processes or builds: the `-m "not slow"` loop skips them


def write_data(path, n):
    rng = np.random.default_rng(0)
    rows = [f"row {i} " + " ".join(rng.choice(["good", "bad", "film", "plot"], 6)) + f"\t{i % 2}" for i in range(n)]
    path.write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    return path


@pytest.fixture
def server(tmp_path):
    srv = TrainerServer(ServerConfig(host="127.0.0.1", port=0, runs_dir=str(tmp_path / "runs"), queue_size=4))
    port = srv.start()
    yield port
    srv.stop()


def test_dropped_links_resume_without_loss(tiny_engine, tmp_path, server, link_proxy):
    proxy = link_proxy(server, rate=400_000)
    task = get_task("sst2")
    examples = load_examples(write_data(tmp_path / "d.tsv", 160), task)
    trainer = StreamClient(Backbone(tiny_engine), examples, task,
                          TrainOptions(server=f"ws://127.0.0.1:{proxy.port}", batch_size=8, epochs=2, mode="tokens",
                                       run="drops", progress=False))
    cuts = []

    def cutter():
        marks = iter([60_000, 160_000, 300_000])
        mark = next(marks)
        while trainer.model_bytes is None and len(cuts) < 3:
            if proxy.bytes_up > mark:
                proxy.cut()
                cuts.append(proxy.bytes_up)
                mark = next(marks, None)
                if mark is None:
                    break
            time.sleep(0.01)

    t = threading.Thread(target=cutter, daemon=True)
    t.start()
    stats = trainer.run()
    t.join(5)
    assert len(cuts) >= 2 and stats.reconnects >= 2
    assert trainer.model_meta["metrics"]["samples_trained"] == 2 * 160


def test_bits_adapt_to_a_throttled_uplink(tiny_engine_factory, tmp_path, server, link_proxy):
    engine = tiny_engine_factory(quant="fp16")
    proxy = link_proxy(server)  # unthrottled at first
    task = get_task("sst2")
    examples = load_examples(write_data(tmp_path / "d.tsv", 256), task)
    opts = TrainOptions(server=f"ws://127.0.0.1:{proxy.port}", batch_size=8, mode="tokens", bits="auto",
                        latency_target_s=0.05, run="adaptive", progress=False, prefetch=1)
    trainer = StreamClient(Backbone(engine), examples, task, opts)
    trainer.planner.every = 2

    def throttle():
        while len(trainer.planner.history) < 3 and trainer.model_bytes is None:
            time.sleep(0.01)
        proxy.set_rate(50_000)  # 50 kB/s: a fraction of what fp16 taps need

    threading.Thread(target=throttle, daemon=True).start()
    stats = trainer.run()
    plans = [h["plan"] for h in stats.bit_plans]
    bits = [sum({"nf4": 4, "int8": 8, "fp16": 16}[f] for f in p) for p in plans]
    assert bits[0] > min(bits), plans  # fast link: more bits; throttled: fewer
    assert plans[-1] == ["nf4"] * len(plans[-1])
    assert trainer.model_meta["metrics"]["samples_trained"] == 256


def test_paper_rule_switches_formats_in_the_graph_on_a_throttled_uplink(tiny_engine_factory, tmp_path, server,
                                                                        link_proxy):
    engine = tiny_engine_factory(quant="fp16", tap_formats="int4,nf4,fp8,int8,fp16")
    proxy = link_proxy(server)
    task = get_task("sst2")
    examples = load_examples(write_data(tmp_path / "d.tsv", 256), task)
    opts = TrainOptions(server=f"ws://127.0.0.1:{proxy.port}", batch_size=8, mode="tokens", bits="auto:paper",
                        latency_target_s=0.05, run="paper", progress=False, prefetch=1)
    trainer = StreamClient(Backbone(engine), examples, task, opts)
    assert trainer.plan_in_graph and trainer.planner.rule == "paper"
    trainer.planner.every = 2

    def throttle():
        while len(trainer.planner.history) < 3 and trainer.model_bytes is None:
            time.sleep(0.01)
        proxy.set_rate(20_000)  # 20 kB/s: below even the all-int4 plan

    threading.Thread(target=throttle, daemon=True).start()
    stats = trainer.run()
    plans = [h["plan"] for h in stats.bit_plans]
    assert any(f != "int4" for f in plans[0]), plans  # fast link: upgrades taken
    assert plans[-1] == ["int4"] * len(plans[-1])  # throttled: the paper's lowest rung
    assert trainer.model_meta["metrics"]["samples_trained"] == 256
    assert (engine / "distortion.json").is_file()
