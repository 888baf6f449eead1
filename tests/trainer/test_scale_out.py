"""A trainer of several ranks (trainer/distributed.py, trainer/world_fed.py; docs/scale_out.md).

Fast: placement, the redirect pin, the world-size check, and 2 gloo ranks (torch.multiprocessing)
taking federated world steps: bit-identical parameters on both ranks after every step, equal to one
process stepping on the same rows. Slow: 2 real `trainer serve` ranks (the environment torchrun
sets) flooded by SimDevices: redirects, exactly-once accounting, and a kill -9 of one rank resumed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mobillm.common.messages import Hello
from mobillm.common.netsim import free_port, wait_listening
from mobillm.edge_runtime.simulate import SimDevice, SyntheticTask
from mobillm.trainer.cli import main as trainer_main
from mobillm.trainer.config import ConfigError, FedConfig, OptimConfig, ServerConfig, WorldConfig
from mobillm.trainer.data import rows_for_model
from mobillm.trainer.distributed import World, check_config, check_world_file, owner_rank, write_world_file
from mobillm.trainer.federated import Federated, family_of
from mobillm.trainer.run import read_trained_ids
from mobillm.trainer.world_fed import shared_step

TAPS = [{"layer": 1, "hidden": 32, "fmt": "nf4", "block_size": 16},
        {"layer": 2, "hidden": 32, "fmt": "int8", "block_size": 16}]
# Rows each rank contributes per world step (None: none that step, zero weight).
PLAN = [((0, 8), (8, 16)), ((16, 20), None), (None, (20, 32)), ((32, 35), (35, 41))]


def _strategy(folder: Path) -> tuple[Federated, Hello, SyntheticTask]:
    data = SyntheticTask(TAPS, n_samples=64)
    hello = Hello.from_meta(SimDevice("ws://x/", data, device_id="d0").hello())
    config = ServerConfig(runs_dir=str(folder), federated=True, fed=FedConfig(width=32, warmup_samples=8))
    strategy = Federated("fed-synth", folder / "fed-synth", config, hello)
    Federated._add_family(strategy, family_of(hello))
    return strategy, hello, data


def _params(strategy: Federated) -> np.ndarray:
    return torch.cat([p.detach().reshape(-1) for p in strategy.model.parameters()]).numpy().copy()


def _world_steps(strategy, hello, data, slices, all_reduce) -> list[np.ndarray]:
    """Run PLAN with this rank's slices (one per step); the parameters after every step."""
    family = family_of(hello).key
    samples, out = 0, []
    for k, mine in enumerate(slices):
        rows = None if mine is None else rows_for_model(data.batch(k, np.arange(*mine), "tokens"), "last")
        contributions = [(family, 0 if s is None else s[1] - s[0]) for s in PLAN[k]]
        shared_step(strategy, rows, family, hello.taps, contributions, samples, all_reduce)
        samples += sum(n for _, n in contributions)
        strategy.family_samples[family] = samples
        out.append(_params(strategy))
    return out


def _rank(rank: int, size: int, port: int, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)
    try:
        strategy, hello, data = _strategy(Path(folder) / f"rank{rank}")
        params = _world_steps(strategy, hello, data, [p[rank] for p in PLAN],
                              lambda t: dist.all_reduce(t, op=dist.ReduceOp.SUM))
        np.save(Path(folder) / f"rank{rank}.npy", np.stack(params))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_bit_identical_and_equal_to_one_process(tmp_path):
    # fork: the children share the imported torch and the optimizer's first-use imports (a spawned
    # child imports them again: seconds on 2 busy cores)
    start = _params(_strategy(tmp_path / "fresh")[0])
    ctx = mp.get_context("fork")
    port = free_port()
    ranks = [ctx.Process(target=_rank, args=(r, 2, port, str(tmp_path))) for r in range(2)]
    for p in ranks:
        p.start()
    for p in ranks:
        p.join(120)
    assert [p.exitcode for p in ranks] == [0, 0]
    rank0, rank1 = np.load(tmp_path / "rank0.npy"), np.load(tmp_path / "rank1.npy")
    for step in range(len(PLAN)):
        assert np.array_equal(rank0[step], rank1[step]), f"ranks differ after step {step + 1}"
    # One process, each world step's rows concatenated in rank order, the same loop.
    strategy, hello, data = _strategy(tmp_path / "single")
    whole = [None if all(s is None for s in step) else
             np.concatenate([np.arange(*s) for s in step if s is not None]) for step in PLAN]
    family = family_of(hello).key
    samples, single = 0, []
    for k, ids in enumerate(whole):
        rows = rows_for_model(data.batch(k, ids, "tokens"), "last")
        shared_step(strategy, rows, family, hello.taps, [(family, len(ids))], samples, lambda t: None)
        samples += len(ids)
        strategy.family_samples[family] = samples
        single.append(_params(strategy))
    for step in range(len(PLAN)):
        assert not np.array_equal(single[step], start)
        np.testing.assert_allclose(rank0[step], single[step], rtol=1e-5, atol=1e-6)


def test_placement_is_stable_and_spreads():
    owners = [owner_rank("fed-sst2", f"phone-{i}", 4) for i in range(400)]
    assert owners == [owner_rank("fed-sst2", f"phone-{i}", 4) for i in range(400)]
    assert all(60 < owners.count(r) < 140 for r in range(4))  # about 100 each
    world = World(1, 2)
    config = ServerConfig(port=9000, federated=True)
    hello = Hello.from_meta(SimDevice("ws://x/", SyntheticTask(TAPS), device_id="phone-7").hello())
    owner = world.owner("fed-synth", "phone-7")
    assert world.redirect_for(hello, config) == (None if owner == 1 else "ws://127.0.0.1:9000/")
    fronted = ServerConfig(port=9000, world=WorldConfig(rank_url="wss://front.example/r{rank}?p={port}"))
    assert World(0, 2).url(fronted, 1) == "wss://front.example/r1?p=9001"


def test_a_single_device_run_is_placed_by_its_name():
    """Two devices naming one single-device run meet on one rank (the second is refused there with
    run_mismatch, as by one process), whatever their device ids."""
    config = ServerConfig(port=9000)
    owners = set()
    for i in range(8):
        hello = Hello.from_meta(SimDevice("ws://x/", SyntheticTask(TAPS), device_id=f"phone-{i}", run="shared").hello())
        owners.add(World(0, 2).redirect_for(hello, config))
    assert len(owners) == 1


def test_world_env():
    assert World.from_env({}) is None
    assert World.from_env({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"}) == World(3, 4, 1)
    with pytest.raises(Exception, match="outside a world"):
        World.from_env({"WORLD_SIZE": "2", "RANK": "2"})


def test_what_a_world_refuses():
    with pytest.raises(ConfigError, match="--port 0"):
        check_config(ServerConfig(port=0), World(0, 2))
    with pytest.raises(ConfigError, match="fp16"):
        check_config(ServerConfig(port=9000, federated=True, optim=OptimConfig(precision="fp16")), World(0, 2))
    check_config(ServerConfig(port=9000, federated=True, optim=OptimConfig(precision="bf16")), World(0, 2))
    with pytest.raises(ConfigError, match="--rank-url"):  # devices would be sent to ws://0.0.0.0:PORT/
        check_config(ServerConfig(port=9000, host="0.0.0.0"), World(0, 2))
    check_config(ServerConfig(port=9000, host="0.0.0.0", world=WorldConfig(rank_url="ws://h:{port}/")), World(0, 2))


def test_world_size_mismatch_on_resume_exits_2(tmp_path, capsys):
    runs = tmp_path / "runs"
    write_world_file(runs, 2)
    check_world_file(runs, 2, resume=True)  # the same size resumes
    check_world_file(runs, 1, resume=False)  # a new world on old runs is refused only by their checkpoints
    code = trainer_main(["serve", "--runs", str(runs), "--resume", "--port", str(free_port())])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "world of 2 ranks" in err[0] and "has 1" in err[0]


# ---------------------------------------------------------------- real ranks (slow)

def _start_rank(rank: int, size: int, port: int, master: int, runs: Path, log: Path, *extra) -> subprocess.Popen:
    env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(master), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "mobillm.trainer.cli", "serve", "--runs", str(runs), "--port",
           str(port), "--threads", "1", "--side-width", "32", "--queue", "4", "--checkpoint-every", "4",
           "--bitplan-every", "0", "--resume", "--world-timeout", "20", *extra]
    return subprocess.Popen(cmd, env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)


def _start_world(size, runs, tmp_path, *extra, federated=True):
    extra = ("--federated", *extra) if federated else extra
    port, master = free_port(), free_port()
    while any(p == master for p in range(port, port + size)):
        master = free_port()
    procs = [_start_rank(r, size, port, master, runs, tmp_path / f"rank{r}.log", *extra) for r in range(size)]
    for r in range(size):
        wait_listening(port + r, procs[r], timeout=120)
    return port, procs


def _stop_world(procs, timeout=60):
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    return [p.wait(timeout) for p in procs]


def _devices(port, n, epochs=2, n_samples=(48,)):
    """Devices phone-0.. with n_samples[i % len(n_samples)] samples each (uneven: ranks run dry at times)."""
    return [SimDevice(f"ws://127.0.0.1:{port}/", SyntheticTask(TAPS, n_samples=n_samples[i % len(n_samples)]),
                      device_id=f"phone-{i}", epochs=epochs, batch_size=8) for i in range(n)]


def _exactly_once(runs: Path, devices, epochs: int) -> None:
    for d in devices:
        per_epoch = read_trained_ids(runs / "fed-synth", d.device_id)
        assert sorted(per_epoch) == list(range(epochs)), d.device_id
        for epoch, ids in per_epoch.items():
            assert sorted(ids) == list(range(d.data.n_samples)), (d.device_id, epoch)


@pytest.mark.slow
def test_two_ranks_flooded_exactly_once(tmp_path):
    runs = tmp_path / "runs"
    port, procs = _start_world(2, runs, tmp_path)
    try:
        devices = _devices(port, 4, n_samples=(16, 64, 24, 48))
        results = {}
        threads = [threading.Thread(target=lambda d=d: results.__setitem__(d.device_id, d.run())) for d in devices]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        for d in devices:
            r = results[d.device_id]
            assert r.done is not None, (d.device_id, r.error)
            owner = owner_rank("fed-synth", d.device_id, 2)
            assert r.redirects == ([] if owner == 0 else [f"ws://127.0.0.1:{port + 1}/"])
        assert {owner_rank("fed-synth", d.device_id, 2) for d in devices} == {0, 1}  # both ranks trained
    finally:
        codes = _stop_world(procs)
    assert codes == [0, 0], [(tmp_path / f"rank{r}.log").read_text()[-2000:] for r in range(2)]
    _exactly_once(runs, devices, 2)
    steps = [json.loads(x) for x in (runs / "fed-synth" / "metrics.jsonl").read_text().splitlines()]
    assert sum(s["rows"] for s in steps) == 2 * (16 + 64 + 24 + 48)
    assert any(0 in s["world_rows"] and s["rows"] for s in steps)  # steps where one rank had nothing
    assert json.loads((runs / "world.json").read_text()) == {"world_size": 2}


@pytest.mark.slow
def test_kill_9_of_a_rank_then_the_world_resumes(tmp_path):
    runs = tmp_path / "runs"
    port, procs = _start_world(2, runs, tmp_path)
    devices = _devices(port, 2, epochs=3, n_samples=(64,))
    # phone-0 and phone-1 land on different ranks (checked below); stream a few batches each, then kill rank 1.
    assert {owner_rank("fed-synth", d.device_id, 2) for d in devices} == {0, 1}
    for d in devices:
        d.run(stop_after_batches=6, send_done=False)
    deadline = time.monotonic() + 60
    while not (runs / "fed-synth" / "checkpoint.pt").is_file() and time.monotonic() < deadline:
        time.sleep(0.2)
    os.kill(procs[1].pid, signal.SIGKILL)
    assert procs[0].wait(60) == 1  # rank 0 lost the world: no checkpoint after the last one, exit 1
    assert "lost the world" in (tmp_path / "rank0.log").read_text()
    port, procs = _start_world(2, runs, tmp_path)  # what torchrun --max-restarts does
    try:
        devices = _devices(port, 2, epochs=3, n_samples=(64,))
        for d in devices:
            result = d.run()
            assert result.done is not None, result.error
    finally:
        codes = _stop_world(procs)
    assert codes == [0, 0]
    _exactly_once(runs, devices, 3)


@pytest.mark.slow
def test_independent_runs_sharded_across_ranks(tmp_path):
    """Single-device runs: each lives on the rank that owns its run name; no collectives."""
    runs = tmp_path / "runs"
    port, procs = _start_world(2, runs, tmp_path, federated=False)
    try:
        devices = _devices(port, 4, n_samples=(32,))
        for d in devices:
            d.run_name = f"solo-{d.device_id}"
        results = [d.run() for d in devices]
    finally:
        codes = _stop_world(procs)
    assert codes == [0, 0]
    owners = [owner_rank(f"solo-{d.device_id}", "", 2) for d in devices]  # single-device runs: by name
    assert set(owners) == {0, 1}
    for d, r, owner in zip(devices, results, owners):
        assert r.done is not None, r.error
        assert r.redirects == ([] if owner == 0 else [f"ws://127.0.0.1:{port + 1}/"])
        per_epoch = read_trained_ids(runs / d.run_name)
        assert [sorted(ids) for ids in per_epoch.values()] == [list(range(32))] * 2


def test_world_federated_run_is_observed(tmp_path):
    """A rank's federated runs reach the run observers (status page, /metrics, TensorBoard) like any run:
    a world of one gloo rank in this process, one device."""
    from mobillm.trainer.server import TrainerServer
    from mobillm.trainer.status import snapshot
    from mobillm.trainer.world_fed import Coordinator

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        world = World(0, 1)
        config = ServerConfig(port=0, runs_dir=str(tmp_path / "runs"), federated=True, threads=1,
                              fed=FedConfig(width=32), tensorboard=False, bitplan_every=0)
        coordinator = Coordinator(world, config)
        server = TrainerServer(config, world=world, coordinator=coordinator)
        server.start()
        coordinator.start()
        try:
            SimDevice(server.url, SyntheticTask(TAPS, n_samples=16), device_id="phone-0", epochs=1,
                      batch_size=8).run()
            trace = server.http.traces["fed-synth"]
            assert [s for s, _ in trace.curve] == [1, 2] and trace.last["loss"] > 0
            (run,) = snapshot(server, server.http.traces, 0.0)["runs"]
            assert run["name"] == "fed-synth" and run["step"] == 2 and len(run["loss_curve"]) == 2
        finally:
            server.stop()
    finally:
        dist.destroy_process_group()


def test_every_run_kind_writes_one_step_record_schema(start_server, tmp_path):
    """One device, federated, and a world of ranks (one gloo rank here) train through the one loop, so
    every metrics.jsonl record has the same keys: `training.StepRecord`'s fields."""
    import dataclasses

    from mobillm.trainer.server import TrainerServer
    from mobillm.trainer.training import StepRecord
    from mobillm.trainer.world_fed import Coordinator

    def records(folder: Path) -> list[dict]:
        return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]

    def device(url: str, **kw) -> None:
        result = SimDevice(url, SyntheticTask(TAPS, n_samples=16), device_id="phone-0", epochs=1, batch_size=8,
                           **kw).run()
        assert result.done is not None, result.error

    single = start_server(bitplan_every=0, tensorboard=False)
    device(single.url, run="solo")
    fed = start_server(federated=True, fed=FedConfig(width=32), bitplan_every=0, tensorboard=False,
                       runs_dir=str(tmp_path / "fed-runs"))
    device(fed.url)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        config = ServerConfig(port=0, runs_dir=str(tmp_path / "world-runs"), federated=True, threads=1,
                              fed=FedConfig(width=32), tensorboard=False, bitplan_every=0)
        coordinator = Coordinator(World(0, 1), config)
        server = TrainerServer(config, world=World(0, 1), coordinator=coordinator)
        server.start()
        coordinator.start()
        try:
            device(server.url)
        finally:
            server.stop()
    finally:
        dist.destroy_process_group()
    kinds = {"single": records(tmp_path / "runs" / "solo"), "federated": records(tmp_path / "fed-runs" / "fed-synth"),
             "world": records(tmp_path / "world-runs" / "fed-synth")}
    schema = {f.name for f in dataclasses.fields(StepRecord)}
    for kind, steps in kinds.items():
        assert len(steps) == 2, kind
        assert [set(s) for s in steps] == [schema] * 2, kind
    world = kinds["world"]
    assert all(s["tokens"] > 0 and s["wait_s"] >= 0 and 0 <= s["idle_frac"] <= 1 for s in world)
    assert [(s["rows"], s["rank_rows"], s["world_rows"], s["device"]) for s in world] == [(8, 8, [8], "phone-0")] * 2
    assert [s["tokens"] for s in world] == [s["tokens"] for s in kinds["federated"]]  # the same device's batches
