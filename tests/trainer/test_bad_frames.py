"""Every bad frame gets an ERROR frame and closes that session only; the server keeps serving."""

import threading

import numpy as np
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from mobillm.common import wire
from mobillm.edge_runtime.simulate import SimDevice, SyntheticTask

MAX_FRAME = 64 * 1024


@pytest.fixture
def server(start_server):
    return start_server(max_frame=MAX_FRAME, max_rows=64, token="s3cret")


def good_device(server, taps, name, **kw):
    return SimDevice(server.url, SyntheticTask(taps, n_samples=48), device_id=name, run=name, token="s3cret", **kw)


def session_reply(server, taps, frames, hello=True, name="bad"):
    """Open a session, optionally HELLO, send `frames`; return the ERROR meta and the close code."""
    device = good_device(server, taps, name)
    with connect(server.url, compression=None) as ws:
        if hello:
            ws.send(wire.encode_frame(wire.MsgType.HELLO, device.hello()))
            welcome = wire.decode_frame(ws.recv(timeout=30))
            assert welcome.type == wire.MsgType.WELCOME, welcome.meta
        for frame in frames(device):
            ws.send(frame)
        reply = wire.decode_frame(ws.recv(timeout=30))
        while reply.type in (wire.MsgType.WELCOME, wire.MsgType.CREDIT, wire.MsgType.BITPLAN):  # valid frames first
            reply = wire.decode_frame(ws.recv(timeout=30))
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=30)
    assert reply.type == wire.MsgType.ERROR
    return reply.meta, ws.close_code


def batch(device, seq=0, ids=(0, 1, 2), mutate=None):
    b = device.data.batch(seq, np.array(ids), device.mode)
    if mutate:
        mutate(b)
    return wire.batch_frame(b)


def relabel(value):
    def mutate(b):
        b.labels = np.full(len(b.labels), value, b.labels.dtype)
    return mutate


def retap(i, **changes):
    def mutate(b):
        for key, value in changes.items():
            setattr(b.taps[i], key, value)
    return mutate


def reencode(b, fmt):
    from mobillm.kernels import codec
    t = b.taps[0]
    enc = codec.encode(t.decode(), fmt, t.block_size)
    b.taps[0] = wire.TapPayload(fmt, t.block_size, t.hidden, enc.codes, enc.scales, 0)


CASES = {
    "text frame": (lambda d: ["hello"], "bad_frame"),
    "truncated frame": (lambda d: [batch(d)[:10]], "bad_frame"),
    "frame shorter than its header says": (lambda d: [batch(d)[:-7]], "bad_frame"),
    "wrong version": (lambda d: [(lambda f: f[:4] + bytes([2]) + f[5:])(batch(d))], "bad_frame"),
    "bad magic": (lambda d: [b"XXXX" + batch(d)[4:]], "bad_frame"),
    "meta not an object": (lambda d: [wire.HEADER.pack(wire.MAGIC, 1, 4, 0, 2, 0) + b"[]"], "bad_frame"),
    "truncated batch body": (lambda d: [wire.encode_frame(wire.MsgType.BATCH, None, wire.Batch.from_body(
        wire.decode_frame(batch(d)).body).to_body()[:-9])], "bad_batch"),
    "lengths disagree with tap sizes": (lambda d: [batch(d, mutate=lambda b: setattr(
        b, "lengths", b.lengths + np.uint32(1)))], "bad_batch"),
    "tap width differs from HELLO": (lambda d: [batch(d, mutate=retap(2, hidden=15))], "bad_batch"),
    "tap format differs from HELLO": (lambda d: [batch(d, mutate=lambda b: reencode(b, "int8"))], "bad_batch"),
    "tap missing": (lambda d: [batch(d, mutate=lambda b: b.taps.pop())], "bad_batch"),
    "label out of range": (lambda d: [batch(d, mutate=relabel(2))], "bad_batch"),
    "negative label": (lambda d: [batch(d, mutate=relabel(-1))], "bad_batch"),
    "float labels for a class task": (lambda d: [batch(d, mutate=lambda b: setattr(
        b, "labels", b.labels.astype(np.float32)))], "bad_batch"),
    "mode differs from HELLO": (lambda d: [wire.batch_frame(d.data.batch(0, np.arange(3), "pooled"))], "bad_batch"),
    "too many rows": (lambda d: [batch(d, ids=range(48)), batch(d, 1, ids=list(range(48)) * 2)], "bad_batch"),
    "seq goes backwards": (lambda d: [batch(d, 5), batch(d, 5)], "bad_batch"),
    "server-only message": (lambda d: [wire.encode_frame(wire.MsgType.MODEL, {}, b"x")], "unexpected"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_frame_after_hello(server, taps, case):
    frames, code = CASES[case]
    meta, close_code = session_reply(server, taps, frames, name=f"bad-{abs(hash(case)) % 10**6}")
    assert meta["code"] == code, meta
    assert meta["message"] and close_code == 1008


def test_fixed_bits_reject_other_formats(server, taps):
    def frames(device):
        meta = {**device.hello(), "bits": "int8", "run": "fixed-bits"}
        return [wire.encode_frame(wire.MsgType.HELLO, meta), batch(device)]  # nf4 payloads
    meta, _ = session_reply(server, taps, frames, hello=False)
    assert meta["code"] == "bad_batch" and "int8" in meta["message"]


@pytest.mark.parametrize("hello,code", [
    ({"protocol": 2}, "version"),
    ({"num_labels": 1}, "bad_hello"),
    ({"taps": []}, "bad_hello"),
    ({"taps": [{"layer": 1, "hidden": 32, "fmt": "int3", "block_size": 16}]}, "bad_hello"),
    ({"epochs": "3"}, "bad_hello"),
    ({"run": "../escape"}, "bad_hello"),
    ({"bits": "int3"}, "bad_hello"),
    ({"bits": "nf4,int8"}, "bad_hello"),  # two formats for three taps
    ({"token": "wrong"}, "unauthorized"),
    ({"token": None}, "unauthorized"),
])
def test_bad_hello(server, taps, hello, code):
    def frames(device):
        meta = {**device.hello(), **hello}
        return [wire.encode_frame(wire.MsgType.HELLO, {k: v for k, v in meta.items() if v is not None})]
    meta, _ = session_reply(server, taps, frames, hello=False)
    assert meta["code"] == code, meta


def test_batch_before_hello(server, taps):
    """With a token configured the token is checked first: a BATCH carries none, so it is unauthorized."""
    meta, _ = session_reply(server, taps, lambda d: [batch(d)], hello=False)
    assert meta["code"] == "unauthorized"


def test_batch_before_hello_without_token(start_server, taps):
    server = start_server(max_frame=MAX_FRAME, max_rows=64)
    meta, _ = session_reply(server, taps, lambda d: [batch(d)], hello=False)
    assert meta["code"] == "expected_hello"


def test_oversize_message_closes_with_1009(server, taps):
    with connect(server.url, compression=None) as ws:
        ws.send(b"\0" * (MAX_FRAME + 1))
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=30)
    assert ws.protocol.close_rcvd.code == 1009


def test_bad_sessions_do_not_disturb_a_good_one(server, taps):
    """A healthy device streams while broken ones come and go; it finishes untouched."""
    results = {}
    good = good_device(server, taps, "good", epochs=4, batch_size=4)
    thread = threading.Thread(target=lambda: results.setdefault("good", good.run()))
    thread.start()
    for i, case in enumerate(["truncated frame", "label out of range", "tap width differs from HELLO"]):
        frames, code = CASES[case]
        assert session_reply(server, taps, frames, name=f"noise-{i}")[0]["code"] == code
    assert session_reply(server, taps, lambda d: [batch(d)], hello=False)[0]["code"] == "unauthorized"
    thread.join(120)
    result = results["good"]
    assert result.error is None and result.done["samples_trained"] == 4 * 48 and result.model
    # and the server still takes new sessions afterwards
    assert good_device(server, taps, "after", epochs=1, batch_size=16).run().done["samples_trained"] == 48
