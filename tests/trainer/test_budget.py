"""The server's limits against hostile clients, in process: memory budget, auth first + back-off,
pre-auth caps, idle runs released and restored, runs per device, restart without --resume.

The same findings against a real `trainer serve` process, under load: tests/reliability/test_hostile.py."""

import json
import threading
import time

import numpy as np
import pytest
import torch
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from mobillm.common import wire
from mobillm.common.taps import TapSpec
from mobillm.common.procfs import rss_mb
from mobillm.edge_runtime.simulate import SimDevice, SyntheticTask
from mobillm.trainer import budget as mem
from mobillm.trainer import data
from mobillm.trainer.cli import build_parser, server_config
from mobillm.trainer.config import ConfigError, ServerConfig, SideConfig, size
from mobillm.trainer.gate import AdmissionGate
from mobillm.trainer.run import read_trained_ids

LIMITS = {"max_frame": 64 << 10, "session_memory": 16 << 20, "hello_max_bytes": 4096}


def device(server, taps, name, n=48, **kw):
    return SimDevice(server.url, SyntheticTask(taps, n_samples=n), device_id=kw.pop("device_id", name), run=name, **kw)


def reply(server, meta: dict) -> dict:
    """Send one HELLO `meta`; the first frame back (WELCOME or ERROR)."""
    with connect(server.url, compression=None) as ws:
        ws.send(wire.encode_frame(wire.MsgType.HELLO, meta))
        return wire.decode_frame(ws.recv(timeout=30)).meta


def settled(server, timeout: float = 20.0) -> bool:
    """Wait until the budget holds only the process itself and the open runs (sessions have closed)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        held = server.budget.base + sum(r.nbytes for r in server.policy.reservations.values())
        if server.budget.used == held:
            return True
        time.sleep(0.05)
    return False


def budgeted(start_server, free_mib: int, **kw):
    """A server whose --memory-budget leaves about `free_mib` MiB above this process's RSS."""
    return start_server(memory_budget=int((rss_mb() + 60 + free_mib) * mem.MIB), **{**LIMITS, **kw})


def test_sizes_parse_and_bad_ones_exit_2():
    assert size("1G") == 1 << 30 and size("512M") == 512 << 20 and size("1.5GiB") == 3 << 29 and size("4096") == 4096
    args = build_parser().parse_args(["serve", "--memory-budget", "2G", "--max-frame", "1M"])
    config = server_config(args)
    assert config.memory_budget == 2 << 30 and config.max_frame == 1 << 20
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["serve", "--memory-budget", "lots"])
    assert exc.value.code == 2
    with pytest.raises(ConfigError, match="session_memory"):
        ServerConfig(session_memory=64 << 20).validate()  # cannot hold 2 x --max-frame


def test_run_cost_is_sized_without_allocating():
    """Finding 2: a HELLO with 2^20 labels on 768-wide taps asks for a >3 GB head; sizing it allocates nothing."""
    taps = (TapSpec(3, 768, "nf4", 32), TapSpec(6, 768, "nf4", 32))
    hello = type("H", (), {"taps": taps, "out_dim": 1 << 20})()
    mem.run_cost(SideConfig(), type("H", (), {"taps": taps[:1], "out_dim": 2})())  # imports done
    before, t0 = rss_mb(), time.perf_counter()
    cost = mem.run_cost(SideConfig(), hello)
    assert cost > 3 * (1 << 30) * 4  # 806 M parameters x 24 bytes
    assert rss_mb() - before < 16 and time.perf_counter() - t0 < 1


def test_budget_and_allowance_give_back_exactly():
    budget = mem.MemoryBudget(100, base=10)
    held = budget.reserve(60, "a run")
    with pytest.raises(Exception, match="over_budget"):
        budget.reserve(31, "another run")
    share = mem.Allowance(budget.reserve(30, "a session"), limit=20)
    share.take(15)
    with pytest.raises(Exception, match="over_budget"):
        share.take(6)
    share.close()
    assert budget.used == 100  # the session ended, but a batch of it still trains
    share.give(15)
    held.release()
    held.release()
    assert budget.used == 10 and budget.peak == 100


def test_gate_backs_off_wrong_tokens_and_caps_waiting_connections():
    now = [0.0]
    gate = AdmissionGate(total=3, per_address=2, backoff_s=1.0, ban_s=8.0, clock=lambda: now[0])
    for _ in range(3):  # a mistyped token or two cost nothing
        gate.failed("a")
    assert gate.refusal("a") is None
    waits = []
    for _ in range(5):
        gate.failed("a")
        status, _ = gate.refusal("a")
        waits.append(gate._failures["a"][1] - now[0])
        assert status == 429
    assert waits == [1, 2, 4, 8, 8]  # doubling, capped at ban_s
    now[0] += 8.5
    assert gate.refusal("a") is None and gate.refusal("b") is None
    assert gate.opened("b") and gate.opened("b") and not gate.opened("b")  # per address
    assert gate.opened("c") and not gate.opened("d")  # in total
    gate.settled("b")
    assert gate.opened("d")


def test_decode_in_chunks_is_exact(monkeypatch):
    rng = np.random.default_rng(0)
    taps = [TapSpec(0, 48, "nf4", 16), TapSpec(1, 40, "int8", 8)]
    codes = [rng.integers(0, 255, (37, 24), dtype=np.uint8), rng.integers(0, 255, (37, 40), dtype=np.uint8)]
    scales = [rng.random((37, 3)).astype(np.float16), rng.random((37, 5)).astype(np.float16)]
    rows = data.Rows(np.arange(37, dtype=np.uint64), np.zeros(37, np.int64), np.ones(37, np.int64), codes, scales,
                     ["nf4", "int8"])
    whole = data.decode_rows(rows, taps, torch.device("cpu"))
    monkeypatch.setattr(data, "DECODE_CHUNK", 100)  # 2 rows per chunk
    chunked = data.decode_rows(rows, taps, torch.device("cpu"))
    assert all(torch.equal(a, b) for a, b in zip(whole, chunked))


def test_huge_hello_is_refused_over_budget_and_creates_nothing(start_server, taps, tmp_path):
    server = budgeted(start_server, 150)
    greedy = device(server, taps, "greedy").hello()
    greedy["num_labels"] = 1 << 20
    greedy["taps"] = [dict(t, hidden=768) for t in greedy["taps"]]
    meta = reply(server, greedy)
    assert meta["code"] == "over_budget" and "MiB" in meta["message"], meta
    assert not (tmp_path / "runs" / "greedy").exists()
    result = device(server, taps, "good").run()  # the budget it would have taken is still there
    assert result.error is None and result.done["samples_trained"] == 48
    assert settled(server)


def test_auth_comes_first_then_addresses_back_off(start_server, taps):
    server = start_server(token="s3cret", auth_backoff_s=30.0, **LIMITS)
    wrong = device(server, taps, "x", token="nope").hello()
    wrong["protocol"] = 99  # a bad HELLO with a wrong token: the token is what the client learns about
    for _ in range(4):
        assert reply(server, wrong)["code"] == "unauthorized"
    with pytest.raises(InvalidStatus) as exc:  # banned for 30 s after the 4th wrong token
        connect(server.url, compression=None, open_timeout=10)
    assert exc.value.response.status_code == 429


def test_pre_auth_messages_and_connections_are_capped(start_server, taps):
    server = start_server(max_unauthenticated=8, max_unauthenticated_per_address=2, **LIMITS)
    with connect(server.url, compression=None) as ws:  # 5 KiB before any HELLO: closed with 1009
        ws.send(b"\0" * 5000)
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=10)
    assert ws.close_code == 1009
    idle = [connect(server.url, compression=None).__enter__() for _ in range(2)]
    try:
        with pytest.raises(InvalidStatus) as exc:
            connect(server.url, compression=None, open_timeout=10)
        assert exc.value.response.status_code == 503
    finally:
        for ws in idle:
            ws.close()
    deadline = time.monotonic() + 10
    while server.gate.pending and time.monotonic() < deadline:
        time.sleep(0.05)
    assert device(server, taps, "after").run().done["samples_trained"] == 48  # the slots came back


def test_batch_over_the_per_batch_share_is_refused(start_server, taps):
    server = start_server(**{**LIMITS, "max_frame": 1 << 20, "session_memory": 12 << 20})  # 1.1 MiB per batch
    big = [dict(t, hidden=4096, block_size=32) for t in taps]  # 16 rows x 3 taps x 4096 x 4 B x 6 = 4.5 MiB
    dev = device(server, big, "big", mode="pooled")
    with connect(server.url, compression=None) as ws:
        ws.send(wire.encode_frame(wire.MsgType.HELLO, dev.hello()))
        assert wire.decode_frame(ws.recv(timeout=10)).type == wire.MsgType.WELCOME
        ws.send(wire.batch_frame(dev.data.batch(0, np.arange(16), "pooled")))
        error = wire.decode_frame(ws.recv(timeout=10)).meta
    assert error["code"] == "over_budget" and "fewer rows" in error["message"], error
    assert settled(server)


def test_idle_runs_are_released_and_restored(start_server, taps, tmp_path):
    server = start_server(idle_timeout_s=0.4, **LIMITS)
    dev = device(server, taps, "sleepy", batch_size=8)
    assert dev.run(stop_after_batches=2).error is None
    deadline = time.monotonic() + 20
    while "sleepy" in server.policy.reservations or "sleepy" not in server.policy.released:
        assert time.monotonic() < deadline, "the idle run was not released"
        time.sleep(0.05)
    assert "sleepy" not in server.policy.runs and "sleepy" in server.policy.released
    assert settled(server) and server.budget.used == server.budget.base  # its memory went back
    result = dev.run()  # restored from its checkpoint, without --resume
    assert result.welcome["resume"]["samples_done"] == 16 and result.done["samples_trained"] == 48
    ids = read_trained_ids(tmp_path / "runs" / "sleepy")
    assert sorted(ids[0]) == list(range(48))


def test_a_run_released_before_its_first_step_leaves_nothing(start_server, taps, tmp_path):
    """A HELLO without data leaves no folder once released, and the executor threads that opened and
    released its run exit (the reaper swaps pools)."""
    server = start_server(idle_timeout_s=0.3, **LIMITS)
    with connect(server.url, compression=None) as ws:
        ws.send(wire.encode_frame(wire.MsgType.HELLO, device(server, taps, "empty").hello()))
        assert wire.decode_frame(ws.recv(timeout=10)).type == wire.MsgType.WELCOME
    folder = tmp_path / "runs" / "empty"
    assert folder.is_dir()
    io_threads = lambda: [t for t in threading.enumerate() if t.name.startswith("trainer-io")]  # noqa: E731
    deadline = time.monotonic() + 20
    while folder.exists() or "empty" in server.policy.runs or io_threads():
        assert time.monotonic() < deadline, (folder.exists(), io_threads())
        time.sleep(0.05)
    assert "empty" not in server.policy.released
    assert device(server, taps, "empty", n=16).run().done["samples_trained"] == 16  # the name starts afresh
    assert (folder / "trained_ids.jsonl").is_file()


def test_run_folders_are_capped(start_server, taps, tmp_path):
    server = start_server(max_run_folders=1, **LIMITS)
    assert device(server, taps, "kept", n=16).run().error is None
    meta = reply(server, device(server, taps, "another").hello())
    assert meta["code"] == "too_many_runs" and "--max-run-folders" in meta["message"], meta
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["kept"]


def test_hello_then_silence_times_out(start_server, taps):
    server = start_server(idle_timeout_s=0.5, **LIMITS)
    with connect(server.url, compression=None) as ws:
        ws.send(wire.encode_frame(wire.MsgType.HELLO, device(server, taps, "mute").hello()))
        assert wire.decode_frame(ws.recv(timeout=10)).type == wire.MsgType.WELCOME
        frame = wire.decode_frame(ws.recv(timeout=10))
    assert frame.meta["code"] == "timeout" and "credits" in frame.meta["message"]


def test_runs_per_device_are_limited(start_server, taps):
    server = start_server(max_runs_per_client=1, **LIMITS)
    assert device(server, taps, "first", device_id="phone").run(stop_after_batches=1).error is None
    meta = reply(server, device(server, taps, "second", device_id="phone").hello())
    assert meta["code"] == "too_many_runs", meta
    assert device(server, taps, "third", device_id="tablet").run().error is None


def test_restart_without_resume_explains_and_cuts_trained_ids(start_server, taps, tmp_path, caplog):
    first = start_server(**LIMITS)
    dev = device(first, taps, "crashy", batch_size=8)
    assert dev.run(stop_after_batches=3).error is None
    first.stop()  # checkpoints at step 3
    folder = tmp_path / "runs" / "crashy"
    with open(folder / "trained_ids.jsonl", "a") as f:  # what a kill -9 after an unsaved step leaves
        f.write(json.dumps({"step": 4, "first": 24, "ids": list(range(24, 32))}) + "\n")
    second = start_server(**LIMITS)
    dev.url = second.url
    with caplog.at_level("WARNING", "mobillm.trainer"):
        result = dev.run()
    assert result.error["code"] == "run_exists" and "without --resume" in result.error["message"]
    assert "trainer serve --resume" in caplog.text
    assert sum(len(v) for v in read_trained_ids(folder).values()) == 24  # what the checkpoint holds


def test_return_freed_memory_collects_cycles_before_trimming():
    """A released run's objects in reference cycles are freed by the trim pass itself: an idle server
    allocates too little for the cyclic collector's full pass to run on its own (issue 17, back to idle)."""
    import gc
    import weakref

    class Node:
        pass

    enabled = gc.isenabled()
    gc.disable()  # as in an idle server: nothing triggers a collection
    try:
        node = Node()
        node.self = node  # a cycle, as module <-> hooks or thread <-> run
        gone = weakref.ref(node)
        del node
        assert gone() is not None  # only the cyclic collector can free it
        mem.return_freed_memory()
        assert gone() is None
    finally:
        if enabled:
            gc.enable()
