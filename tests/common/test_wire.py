"""The wire format: round trips and the rules every parser enforces."""

import numpy as np
import pytest

from mobillm.common import wire
from mobillm.kernels import codec


def make_batch(mode="tokens", fmt="nf4", regression=False):
    rng = np.random.default_rng(0)
    lengths = np.array([3, 1, 5], np.uint32) if mode == "tokens" else np.ones(3, np.uint32)
    taps = []
    for i, hidden in enumerate([96, 64]):
        enc = codec.encode(rng.standard_normal((int(lengths.sum()), hidden)).astype(np.float32), fmt, 32)
        taps.append(wire.TapPayload(fmt, 32, hidden, enc.codes, enc.scales, i))
    labels = rng.standard_normal(3).astype(np.float32) if regression else np.array([0, 1, 1])
    return wire.Batch(7, np.array([10, 11, 12], np.uint64), labels, lengths, taps, mode)


@pytest.mark.parametrize("mode", ["tokens", "pooled"])
@pytest.mark.parametrize("fmt", codec.FORMATS)
def test_batch_round_trip(mode, fmt):
    batch = make_batch(mode, fmt)
    frame = wire.decode_frame(wire.batch_frame(batch))
    assert frame.type == wire.MsgType.BATCH
    got = wire.Batch.from_body(frame.body)
    assert got.seq == 7 and got.mode == mode and got.n_tokens == batch.n_tokens
    assert np.array_equal(got.sample_ids, batch.sample_ids) and np.array_equal(got.labels, batch.labels)
    for a, b in zip(got.taps, batch.taps):
        assert np.array_equal(a.decode(), b.decode())


def test_regression_labels_travel_as_float():
    got = wire.Batch.from_body(make_batch(regression=True).to_body())
    assert got.labels.dtype == np.float32


def test_control_frame_round_trip():
    f = wire.decode_frame(wire.encode_frame(wire.MsgType.HELLO, {"task": "sst2", "n": 3}))
    assert f.type == wire.MsgType.HELLO and f.meta == {"task": "sst2", "n": 3} and len(f.body) == 0


@pytest.mark.parametrize("mutate,match", [
    (lambda b: b[:10], "truncated frame"),
    (lambda b: b"XXXX" + b[4:], "bad magic"),
    (lambda b: b[:4] + bytes([9]) + b[5:], "version 9"),
    (lambda b: b[:5] + bytes([99]) + b[6:], "unknown message type"),
    (lambda b: b + b"\0", "does not match header"),
])
def test_bad_frames_are_rejected(mutate, match):
    data = wire.batch_frame(make_batch())
    with pytest.raises(wire.WireError, match=match):
        wire.decode_frame(mutate(data))


def test_oversized_frame_rejected_before_parsing():
    with pytest.raises(wire.WireError, match="exceeds the limit"):
        wire.decode_frame(wire.batch_frame(make_batch()), max_frame=100)


def test_body_sizes_are_checked():
    body = make_batch().to_body()
    with pytest.raises(wire.WireError, match="truncated body|do not match"):
        wire.Batch.from_body(body[:-5])
    with pytest.raises(wire.WireError, match="trailing"):
        wire.Batch.from_body(body + b"\0\0")
    batch = make_batch()
    batch.lengths = np.array([3, 1, 6], np.uint32)  # claims one token more than the taps hold
    with pytest.raises(wire.WireError, match="do not match|truncated"):
        wire.Batch.from_body(batch.to_body())


def test_text_frames_rejected():
    with pytest.raises(wire.WireError, match="binary"):
        wire.decode_frame("hello")


def test_only_model_frames_get_the_model_limit():
    model = wire.encode_frame(wire.MsgType.MODEL, {}, bytes(3000))
    batch = wire.encode_frame(wire.MsgType.BATCH, {}, bytes(3000))
    assert len(wire.decode_frame(model, 2048, max_model_frame=4096).body) == 3000  # the device
    for frame, limits in ((batch, (2048, 4096)), (model, (2048, 2048)), (model, (2048, None))):
        with pytest.raises(wire.WireError, match="exceeds the limit of 2048"):
            wire.decode_frame(frame, *limits)
    with pytest.raises(wire.WireError, match="exceeds the limit of 4096"):
        wire.decode_frame(wire.encode_frame(wire.MsgType.MODEL, {}, bytes(5000)), 2048, max_model_frame=4096)
