"""Hostile input. Random and mutated frames through everything the server runs on a frame before
training (wire.decode_frame, Hello.from_meta, the token check, wire.Batch.from_body, check_batch,
and the rows/dequantization the training step reads) raise only WireError or ProtocolError, never
hang, and never allocate in proportion to a declared size (sizes are checked against the bytes
actually present before anything is read). Against a live server, fuzzed sessions come and go
while a healthy device trains, which finishes untouched.

Specific errors for specific faults are in tests/trainer/test_bad_frames.py (oversized -> close
1009 before the message is read; truncated, wrong version, bad magic -> bad_frame; label out of
range, tap width/format, row count -> bad_batch; bad HELLO fields, wrong token -> bad_hello /
unauthorized) and tests/reliability/test_auth.py (another task's or manifest's run -> run_mismatch).
"""

import contextlib
import signal
import struct
import threading
import tracemalloc
from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

torch = pytest.importorskip("torch", exc_type=ModuleNotFoundError)

from mobillm.common import wire  # noqa: E402
from mobillm.common.messages import Hello, ProtocolError  # noqa: E402
from mobillm.edge_runtime.simulate import SimDevice, SyntheticTask  # noqa: E402
from mobillm.trainer.config import ServerConfig  # noqa: E402
from mobillm.trainer.data import decode_rows, rows_for_model  # noqa: E402
from mobillm.trainer.protocol import check_batch  # noqa: E402
from mobillm.trainer.run import read_trained_ids  # noqa: E402
from mobillm.trainer.server import TrainerServer  # noqa: E402

pytestmark = pytest.mark.slow  # real servers, processes or builds: the `-m "not slow"` loop skips them

TAPS = [{"layer": 1, "hidden": 32, "fmt": "nf4", "block_size": 16},
        {"layer": 2, "hidden": 24, "fmt": "int8", "block_size": 8},
        {"layer": 3, "hidden": 16, "fmt": "fp16", "block_size": 16}]
MAX_FRAME, MAX_ROWS, MAX_TOKENS = 256 * 1024, 64, 4096
TOKEN = "s3cret-token"
CODES = {"bad_frame", "expected_hello", "version", "bad_hello", "unauthorized", "run_exists", "run_mismatch",
         "no_credit", "bad_batch", "unexpected", "replaced", "training_failed", "shutting_down", "timeout",
         "over_budget", "too_many_runs"}

DATA = SyntheticTask(TAPS, n_samples=64)
DEVICE = SimDevice("ws://unused", DATA, token=TOKEN)
HELLO = Hello.from_meta(DEVICE.hello())
SEEDS = [
    wire.encode_frame(wire.MsgType.HELLO, DEVICE.hello()),
    wire.batch_frame(DATA.batch(0, np.arange(5), "tokens")),
    wire.batch_frame(DATA.batch(1, np.arange(3), "pooled")),
    wire.batch_frame(SyntheticTask(TAPS, task_type="regression", num_labels=1).batch(2, np.arange(4), "tokens")),
    wire.encode_frame(wire.MsgType.DONE, {}),
]
FRAME_FIELDS = [(4, "B"), (5, "B"), (6, "<H"), (8, "<I"), (12, "<I")]  # version, type, flags, meta_len, body_len
SERVER = TrainerServer(ServerConfig(port=0, token=TOKEN, max_frame=MAX_FRAME, max_rows=MAX_ROWS,
                                    max_tokens=MAX_TOKENS))  # never started: only its checks are used


class Hang(Exception):
    pass


@contextlib.contextmanager
def no_hang(seconds: float = 10.0):
    """Fail (instead of hanging the suite) if the body takes longer than `seconds`."""
    def alarm(*_):
        raise Hang(f"parsing took more than {seconds} s")
    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def mutate(draw, data: bytearray, fields=()) -> bytearray:
    """1 to 4 random edits: bit flips, byte writes, cuts, additions, splices, and arbitrary values
    written over the integer fields in `fields` ((offset, struct format) pairs)."""
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "byte", "truncate", "extend", "splice"] + ["field"] * 2 * bool(fields)))
        if op == "flip" and data:
            data[draw(st.integers(0, len(data) - 1))] ^= 1 << draw(st.integers(0, 7))
        elif op == "byte" and data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        elif op == "truncate":
            data = data[:draw(st.integers(0, len(data)))]
        elif op == "extend":
            data += draw(st.binary(max_size=64))
        elif op == "field":
            offset, fmt = draw(st.sampled_from(fields))
            size = struct.calcsize(fmt)
            if offset + size <= len(data):
                top = 2 ** (8 * size) - 1
                struct.pack_into(fmt, data, offset, draw(st.integers(0, top) | st.sampled_from([0, 1, top])))
        elif op == "splice" and data:
            i = draw(st.integers(0, len(data)))
            data = data[:i] + draw(st.binary(max_size=32)) + data[i + draw(st.integers(0, 32)):]
    return data


def tap_fields(body: bytes) -> list[tuple[int, str]]:
    """(offset, format) of every integer field in a BATCH body: its header and each tap header."""
    batch = wire.Batch.from_body(body)
    n = len(batch.sample_ids)
    fields = [(0, "<Q"), (8, "<I"), (12, "<H"), (14, "B"), (15, "B"), (16 + 16 * n, "<I")]
    offset = wire.BATCH_HEADER.size + n * (8 + batch.labels.itemsize + 4)
    for tap in batch.taps:
        fields += [(offset, "B"), (offset + 1, "B"), (offset + 2, "<H"), (offset + 4, "<I"), (offset + 8, "<Q"),
                   (offset + 16, "<I")]
        offset += wire.TAP_HEADER.size + tap.codes.nbytes + tap.scales.nbytes
    return fields


@st.composite
def mutated_frames(draw, seeds=tuple(SEEDS)):
    """A seed frame broken at one layer: the frame header and lengths, the meta JSON (lengths kept
    right), or the BATCH body (lengths kept right), so each parser layer gets its share."""
    seed = draw(st.sampled_from(seeds))
    frame = wire.decode_frame(seed)
    meta = bytes(seed[wire.HEADER.size:len(seed) - len(frame.body)])
    layer = draw(st.sampled_from(["frame", "meta", "body", "body"] if frame.body else ["frame", "meta"]))
    if layer == "frame":
        return bytes(mutate(draw, bytearray(seed), FRAME_FIELDS))
    body = bytes(frame.body)
    if layer == "meta":
        meta = bytes(mutate(draw, bytearray(meta)))
    else:
        body = bytes(mutate(draw, bytearray(body), tap_fields(body)))
    return wire.HEADER.pack(wire.MAGIC, wire.VERSION, int(frame.type), 0, len(meta), len(body)) + meta + body


def server_parse(data: bytes) -> str:
    """What the server does with one message before training it (WireError mapped to the codes the
    server sends: bad_frame from the frame layer, bad_batch from the body); returns what it was."""
    try:
        frame = wire.decode_frame(data, MAX_FRAME)
    except wire.WireError as exc:
        raise ProtocolError("bad_frame", str(exc)) from None
    if frame.type == wire.MsgType.HELLO:
        hello = Hello.from_meta(frame.meta)
        hello.identity()
        SERVER.check_token(hello.token)
        return "hello"
    if frame.type == wire.MsgType.BATCH:
        try:
            batch = wire.Batch.from_body(frame.body, MAX_ROWS, MAX_TOKENS)
        except wire.WireError as exc:
            raise ProtocolError("bad_batch", str(exc)) from None
        check_batch(batch, HELLO, HELLO.formats())
        for pooling in ("last", "mean"):
            decode_rows(rows_for_model(batch, pooling), HELLO.taps, torch.device("cpu"))
        return "batch"
    return frame.type.name


def check_one(data: bytes, seen: Counter) -> None:
    """Only protocol errors, bounded time, and memory bounded by the bytes actually received."""
    tracemalloc.start()  # traces Python and numpy allocations while the frame is parsed
    try:
        with no_hang():
            try:
                seen[server_parse(data)] += 1
            except wire.WireError:
                seen["WireError"] += 1
            except ProtocolError as exc:
                seen[exc.code] += 1
        grown = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert grown <= 16 * len(data) + 256 * 1024, f"{grown} bytes allocated for a {len(data)}-byte frame"


def test_seeds():
    """The seeds are valid frames; the pooled and regression batches are ones this session's HELLO refuses."""
    assert [server_parse(s) for s in (SEEDS[0], SEEDS[1], SEEDS[4])] == ["hello", "batch", "DONE"]
    for seed in SEEDS[2:4]:
        wire.Batch.from_body(wire.decode_frame(seed).body)
        with pytest.raises(ProtocolError, match="bad_batch"):
            server_parse(seed)


def test_mutated_frames(profile, report):
    seen: Counter = Counter()

    @settings(max_examples=profile["fuzz_examples"], deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(mutated_frames())
    @example(SEEDS[1][:12] + struct.pack("<I", 2**32 - 1) + SEEDS[1][16:])  # body_len says 4 GiB
    @example(wire.HEADER.pack(wire.MAGIC, 1, 1, 0, 60000, 0) + b"[" * 60000)  # nesting deeper than the stack
    def fuzz(data):
        check_one(data, seen)

    fuzz()
    assert seen["batch"] and seen["bad_frame"] and seen["bad_batch"], seen  # every layer is reached
    report(fuzz_cases=sum(seen.values()), fuzz_outcomes=dict(seen.most_common(8)))


def test_random_bytes(profile, report):
    seen: Counter = Counter()

    @settings(max_examples=profile["fuzz_examples"] // 2, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.one_of(st.binary(max_size=2048), st.binary(max_size=64).map(lambda b: wire.MAGIC + bytes([1]) + b)))
    def fuzz(data):
        check_one(data, seen)

    fuzz()
    report(fuzz_cases=sum(seen.values()), fuzz_outcomes=dict(seen.most_common(8)))


def test_declared_sizes_are_checked_before_allocation():
    """Headers that declare huge sizes over a few real bytes cost a few bytes of memory."""
    body = bytearray(wire.decode_frame(SEEDS[1]).body)
    huge = [
        SEEDS[1][:8] + struct.pack("<II", wire.MAX_META, 2**32 - 1) + SEEDS[1][16:],  # meta and body lengths
        wire.encode_frame(wire.MsgType.BATCH, None, wire.BATCH_HEADER.pack(0, MAX_ROWS, 3, 0, 0)),  # rows, no bytes
        wire.encode_frame(wire.MsgType.BATCH, None, bytes(body[:16]) + b"\xff" * 64),  # lengths of 2^32-1 tokens
    ]
    for offset, value in ((0, 5 * 8 * 2 ** 40), (8, 2**64 - 1)):  # codes_nbytes / scales_nbytes of tap 0
        forged = bytearray(body)
        tap0 = wire.BATCH_HEADER.size + 5 * (8 + 8 + 4)
        struct.pack_into("<Q" if offset == 0 else "<I", forged, tap0 + 8 + (0 if offset == 0 else 8),
                         value if offset == 0 else 2**32 - 1)
        huge.append(wire.encode_frame(wire.MsgType.BATCH, None, bytes(forged)))
    for data in huge:
        seen: Counter = Counter()
        check_one(data, seen)
        assert set(seen) <= {"bad_frame", "bad_batch"}, seen
    with pytest.raises(wire.WireError, match="exceeds the limit"):
        wire.decode_frame(b"\0" * (MAX_FRAME + 1), MAX_FRAME)


def test_hello_fields(profile, report):
    scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
    json_values = scalars | st.lists(scalars, max_size=3) | st.dictionaries(st.text(max_size=4), scalars, max_size=2)
    tap = st.fixed_dictionaries({k: scalars | st.integers(-2, 70000) for k in ("layer", "hidden", "block_size")}
                                | {"fmt": scalars | st.sampled_from(["nf4", "int8", "fp16", "int3"])})
    fields = st.dictionaries(st.sampled_from(sorted(DEVICE.hello()) + ["run", "bits", "token", "num_layers", "x"]),
                             json_values | st.lists(tap, max_size=3), max_size=4)
    seen: Counter = Counter()

    @settings(max_examples=profile["fuzz_examples"], deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(fields, st.sets(st.sampled_from(sorted(DEVICE.hello())), max_size=2))
    def fuzz(changes, dropped):
        meta = {k: v for k, v in {**DEVICE.hello(), **changes}.items() if k not in dropped}
        check_one(wire.encode_frame(wire.MsgType.HELLO, meta), seen)

    fuzz()
    assert seen["hello"] and seen["bad_hello"], seen
    report(fuzz_cases=sum(seen.values()), fuzz_outcomes=dict(seen.most_common(8)))


def test_fuzzed_sessions_never_disturb_a_good_one(profile, tmp_path, report):
    server = TrainerServer(ServerConfig(port=0, runs_dir=str(tmp_path / "runs"), token=TOKEN, max_frame=MAX_FRAME,
                                        max_rows=MAX_ROWS, max_tokens=MAX_TOKENS, threads=1, hello_timeout_s=5,
                                        auth_backoff_s=0.0))  # no ban: every fuzzed token reaches the parser
    server.start()
    try:
        good = SimDevice(server.url, SyntheticTask(TAPS, n_samples=48), run="good", device_id="good", token=TOKEN,
                         epochs=6, batch_size=4)
        result = {}
        thread = threading.Thread(target=lambda: result.setdefault("good", good.run(timeout=120)))
        thread.start()
        codes: Counter = Counter()
        sessions = iter(range(10**6))

        @settings(max_examples=profile["live_fuzz_sessions"], deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(mutated_frames(), st.booleans())
        def fuzz(data, mutate_hello):
            n = next(sessions)
            hello = {**DEVICE.hello(), "run": f"fuzz-{n}", "device_id": f"fuzz-{n}"}
            first = data if mutate_hello else wire.encode_frame(wire.MsgType.HELLO, hello)
            with connect(server.url, compression=None, open_timeout=30) as ws:
                with contextlib.suppress(ConnectionClosed):  # the server may close after any of them
                    ws.send(first)
                    if not mutate_hello:
                        ws.send(data)
                    # A server-only message: if the fuzzed frames were valid, this one is not.
                    ws.send(wire.encode_frame(wire.MsgType.MODEL, {}, b"x"))
                error = None
                with contextlib.suppress(ConnectionClosed):
                    while error is None:
                        frame = wire.decode_frame(ws.recv(timeout=30), wire.MAX_MODEL_FRAME)
                        if frame.type == wire.MsgType.ERROR:
                            error = frame.meta["code"]
                        if frame.type == wire.MsgType.DONE:  # a fuzzed DONE on a run that was complete
                            break
            code = error or ("closed" if ws.protocol.close_rcvd else "done")
            codes[code] += 1
            assert code in CODES | {"closed", "done"}, code  # never server_error: the server caught it

        fuzz()
        thread.join(180)
        assert result["good"].error is None and result["good"].done == {"samples_trained": 6 * 48, "steps": 72}
        per_epoch = read_trained_ids(tmp_path / "runs" / "good")
        assert all(sorted(per_epoch[e]) == list(range(48)) for e in range(6))
        # still serving afterwards
        after = SimDevice(server.url, SyntheticTask(TAPS, n_samples=16), run="after", device_id="after", token=TOKEN)
        assert after.run(timeout=60).done["samples_trained"] == 16
    finally:
        server.stop()
    report(live_fuzz_sessions=sum(codes.values()), live_fuzz_codes=dict(codes.most_common()))
