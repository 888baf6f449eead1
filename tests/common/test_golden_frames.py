"""Golden frames: the exact bytes of every cross-process message, as each side builds it.

Wire bytes are behaviour (an old device must keep talking to a new server and back), so every
message is pinned by the sha256 of its whole frame. A failure here means the encoding changed:
key order, a key's spelling, a default, or the framing itself.
"""

from __future__ import annotations

import hashlib
import json
from types import SimpleNamespace

import numpy as np
import pytest

from mobillm.common import messages, wire
from mobillm.common.messages import (BitPlan, Credit, ErrorReport, FedModel, FedWelcome, ModelMeta, StreamDone,
                                     TrainingDone, Welcome)
from mobillm.common.taps import TapSpec
from mobillm.common.tasks import Task
from mobillm.edge_runtime.stream import StreamClient, TrainOptions, send_mode
from mobillm.kernels import codec
from mobillm.trainer.config import SideConfig

SHA = "ab" * 32
TAPS = [{"layer": 2, "hidden": 64, "fmt": "nf4", "block_size": 32},
        {"layer": 4, "hidden": 64, "fmt": "int8", "block_size": 32}]


def device_hello(tmp_path, **opts) -> bytes:
    """HELLO exactly as `edge-run train` builds it (a stub backbone: the HELLO reads only its manifest)."""
    (tmp_path / "manifest.json").write_text('{"golden": true}\n')
    manifest = SimpleNamespace(model_id="facebook/opt-125m", num_layers=4, summary_row=False,
                               taps=[TapSpec(**t) for t in TAPS])
    client = object.__new__(StreamClient)
    client.bb = SimpleNamespace(manifest=manifest, folder=tmp_path)
    client.task = Task("sst2", "class", 2, ("sentence",), "label", "accuracy")
    client.opts = TrainOptions(**(opts or dict(device_id="phone-1", run="golden", token="s3cret", epochs=2)))
    client.mode = send_mode(client.opts, manifest)  # as StreamClient.__init__ resolves --send
    client.examples = [None] * 96
    return wire.encode_frame(wire.MsgType.HELLO, client.hello())


def welcome() -> bytes:
    return messages.frame(Welcome("s1", "golden", 8, 16, True, False, 192))


def welcome_federated() -> bytes:
    return messages.frame(Welcome("s2", "fed-sst2", 8, 0, False, False, 192, FedWelcome("ab12cd34", [1, 3], 4, 2)))


def welcome_redirect() -> bytes:
    """A trainer of several ranks sends a device to the rank that owns it (docs/scale_out.md)."""
    return messages.frame(Welcome("s3", "fed-sst2", 0, 0, False, False, 0, redirect="ws://127.0.0.1:8766/"))


def credit() -> bytes:
    return messages.frame(Credit(1, 5, 48))


def credit_stop() -> bytes:
    return messages.frame(Credit(0, 11, 80, stop_streaming=True))


def bitplan() -> bytes:
    return messages.frame(BitPlan([0.5, 0.125], 20))


def model_meta() -> bytes:
    side = SideConfig(tap_widths=[64, 64], out_dim=2, side_width=64)
    meta = ModelMeta(side.to_meta(), 2, "sst2", "class", 2, "golden", [TapSpec(**t) for t in TAPS], {"samples_trained": 192, "steps": 12})
    return messages.frame(meta, b"onnx-bytes")


def model_meta_federated() -> bytes:
    side = SideConfig(tap_widths=[], out_dim=2, side_width=128)
    meta = ModelMeta(side.to_meta(), 2, "sst2", "class", 2, "fed-sst2", [TapSpec(**t) for t in TAPS],
                     {"samples_trained": 96, "onnx_max_abs_diff": 0.0, "steps": 30, "shared_samples_trained": 192},
                     FedModel("ab12cd34", [1, 3], 4, 4, 30))
    return messages.frame(meta, b"onnx-bytes")


def done_server() -> bytes:
    return messages.frame(TrainingDone(192, 12))


def done_device() -> bytes:
    return messages.frame(StreamDone(192))


def bye() -> bytes:
    return wire.encode_frame(wire.MsgType.BYE)


def error() -> bytes:
    return messages.frame(ErrorReport("bad_hello", "task 'x y' must match the name pattern"))


def error_over_budget() -> bytes:
    return messages.frame(ErrorReport(messages.OVER_BUDGET, "run 'r' needs 3072.0 MiB but the server has 512.0 MiB "
                                                            "of its --memory-budget 1024 MiB left"))


def batch(fmt: str, mode: str, block_size: int = 32) -> bytes:
    rng = np.random.default_rng(7)
    lengths = np.array([3, 1, 2], np.uint32) if mode == "tokens" else np.full(3, wire.ROWS_PER_SAMPLE[mode], np.uint32)
    taps = []
    for i, hidden in enumerate([64, 96]):
        enc = codec.encode(rng.standard_normal((int(lengths.sum()), hidden)).astype(np.float32), fmt, block_size)
        taps.append(wire.TapPayload(fmt, block_size, hidden, enc.codes, enc.scales, i))
    labels = np.array([0, 1, 1], np.int64)
    return wire.batch_frame(wire.Batch(9, np.array([4, 8, 15], np.uint64), labels, lengths, taps, mode))


def batch_regression() -> bytes:
    rng = np.random.default_rng(3)
    enc = codec.encode(rng.standard_normal((2, 64)).astype(np.float32), "int8", 32)
    tap = wire.TapPayload("int8", 32, 64, enc.codes, enc.scales, 0)
    labels = np.array([0.25, -1.5], np.float32)
    return wire.batch_frame(wire.Batch(1, np.array([1, 2], np.uint64), labels, np.ones(2, np.uint32), [tap], "pooled"))


BUILDERS = {
    "welcome": welcome, "welcome_federated": welcome_federated, "welcome_redirect": welcome_redirect,
    "credit": credit, "credit_stop": credit_stop,
    "bitplan": bitplan, "model_meta": model_meta, "model_meta_federated": model_meta_federated,
    "done_server": done_server, "done_device": done_device, "bye": bye, "error": error,
    "error_over_budget": error_over_budget,
    "batch_regression": batch_regression,
    **{f"batch_{fmt}_{mode}": (lambda fmt=fmt, mode=mode: batch(fmt, mode))
       for fmt in codec.FORMATS for mode in wire.MODES},
    # Per-tensor scaling (block size 0): one scale per tap, sent once.
    **{f"batch_{fmt}_per_tensor_{mode}": (lambda fmt=fmt, mode=mode: batch(fmt, mode, codec.PER_TENSOR))
       for fmt in ("int8", "fp4") for mode in wire.MODES},
}

GOLDEN = {
    # summary mode (two rows a sample) joined the protocol in wave 3: pinned from its first frames
    "batch_int8_summary": "d3a8e3b01f4451955bb113b612a5dc1dcfc7d1bd53fd71dc456508d3f31d651e",
    "batch_fp8_summary": "b3629961191af192cb87de447e979b808c9bcbc9d55c047d8e89ffeb7ef2f538",
    "batch_int4_summary": "9e8e275dc0808d57c1d5bb540f3cf577f4530a611c3f010c43a25558ced1460b",
    "batch_nf4_summary": "aa1aaaf5314a01304a13c796ee0cb2a026286affebf67d8b5c4ca5d108cd62e9",
    "batch_fp16_summary": "24a336cb081e0a867d6b20451cb25f4b1c3031b8893d57ec148cbec95c063a75",
    "batch_fp4_summary": "1dcd2e25e77ae599b414ed702a1d3a4414775c843cb01afaaa3d9e8b167baaf1",
    "batch_int8_per_tensor_summary": "dff4b992bdf6c3c4d04eb119e95ade79b7f66b45b98007319e98018c3f2a9273",
    "batch_fp4_per_tensor_summary": "d2435676ff082ca98897b4d9a1057cb40ea17a0add3f8a9b0a07625ba0eee652",
    "hello_device": "1431edc06a1873eee88d25e0563817f0871d8c51d4ebb35350315e4a4f297df6",
    "hello_device_defaults": "a0979508c7dd78cbc6cc01b3f3b19dcbe926b4713b9bb9a60e4d32e27597410c",
    "batch_fp16_pooled": "0c7b723bbc543faf933a08fc20e5ad671786a84475bc1fd91961a86069c257ed",
    "batch_fp16_tokens": "ecb586233430214e706f3c50e355b570406c4ad787f0990ba34ba4e235c47ff8",
    "batch_fp8_pooled": "5dfc1eba8c661ed6ed38844e91adeede27a202d7c67ce0375f824a711bb41747",
    "batch_fp8_tokens": "f8fb9dbf50526437a2d125b3657c44e0ef83b334c32a03b06c7dee27d889b2d3",
    "batch_fp4_per_tensor_pooled": "850fff2a17b981983edd02998930fbcda9abd56c1ad851ec75f688b2883a8580",
    "batch_fp4_per_tensor_tokens": "c045af7385927bdc4e08d5edf7f957810c9878e93acc7cd54aa87325ffefd004",
    "batch_fp4_pooled": "be52d067efbcca46c5acfb4db715e1c3de52351c93a1042c54953e2f450bd0c4",
    "batch_fp4_tokens": "273b776ac44f50f3c4821e2cf3021593b808deba225afb38be722471975ebd8c",
    "batch_int4_pooled": "5ee35f2c5b7d30959e4f9c96f08e5e22d0fa574fc2fe07c2738837eff25c02a3",
    "batch_int4_tokens": "c27bfe12303fc37d1f427dc526777274a72986168faf812b802c9b9d5437cc84",
    "batch_int8_pooled": "93b2d5af0e8c4611f482d896bfac13c50b13a16a0dfa4833af2703d53e69dce8",
    "batch_int8_tokens": "16d117abc71babc91101f9a35e6b1f0df7df5391493eba44d7af5d055687bddb",
    "batch_int8_per_tensor_pooled": "25a09dd3152a07946620c512bfe0f137ac544a31466edf8a7b127fc65eff11df",
    "batch_int8_per_tensor_tokens": "25676cff581a3c8dd60976e8125b99973cf6e40c3a66f18b7fc42985f7602ba2",
    "batch_nf4_pooled": "b83c8d29bb41c2466d802e78e1fefd615c90253faf41d1c3244b8e4fce157200",
    "batch_nf4_tokens": "d29880381e9901e1838b896aa323087a603c5261150bf41eab60051b231b4865",
    "batch_regression": "3743d0678a9ecf6fdc0cbcd8f78bcbd4f9904cdf503f2987400eff83dacabd11",
    "bitplan": "7ebe7b0faca8e5606f6261b8af5c374f0dbe1f30844772abfab4bc60e82f263b",
    "bye": "92a5f68669c1c1cf4ece3999ac307328d9822eb419689e31f0ec3e1bc0082b5e",
    "credit": "9a78917d13f72ed0af18f2cc2fa35997ac4f2f08af9f4928c36dd40060411fbe",
    "credit_stop": "7df16fdca222f5ed0baf5921a44090562fcf5379d014c1ed9ec39e72b5e4450b",
    "done_device": "fa55abe46c7967ac4342783b000c593ee5cc5cc3a63e41b1ba0e7a4f4f129391",
    "done_server": "b7da4d49cfb36534b311b2c6364bf6247a7410f5cd8e21fb119c6f9ad11d737f",
    "error": "e79c402a6238f8c4301fa4bb5c8374c2706bdc624c3b853e8dd3e08658aaf760",
    "error_over_budget": "8d8360047a4b0bfa9c1eb551cbaea1f16bca16e910892c97b295c27555f333a8",
    "model_meta": "0c060563f1544f0e8caf830ef655dbde9a7c81fd316b433dd52638b23fd1c7a4",
    "model_meta_federated": "5dc35c23490cd8038bc0d3eb55c2736dded5508291dc9f444d9746ccf77f319d",
    "welcome": "6df0f15344599271744ac74bc15c2303747ad005ba531b53ea2e0ea20eb4de67",
    "welcome_federated": "0b9272fdda74ddf531a2e0ee2c9f659582f68a18501f702543770235737f031a",
    "welcome_redirect": "ad40867901cb9d0c24f5145e09aee7f7c73a0977923c5778d7eb7b3c2918f0ee",
}


def check(name: str, frame: bytes) -> None:
    got = hashlib.sha256(frame).hexdigest()
    meta = wire.decode_frame(frame, wire.MAX_MODEL_FRAME).meta
    assert got == GOLDEN[name], f"{name}: frame bytes changed; meta now {json.dumps(meta)}"


def test_device_hello(tmp_path):
    check("hello_device", device_hello(tmp_path))


def test_device_hello_defaults(tmp_path):
    """No run name and no token travel as JSON nulls; bits "auto" and tokens mode as given."""
    check("hello_device_defaults", device_hello(tmp_path, mode="tokens", bits="auto"))


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_frame(name):
    check(name, BUILDERS[name]())


def test_typed_messages_read_back():
    """What one side builds, the other parses to the same values."""
    for build, cls in ((welcome_federated, Welcome), (welcome_redirect, Welcome), (credit_stop, Credit), (bitplan, BitPlan),
                       (done_server, TrainingDone), (error, ErrorReport)):
        frame = wire.decode_frame(build())
        assert messages.frame(cls.from_meta(frame.meta)) == build()
    assert ModelMeta.check(wire.decode_frame(model_meta_federated()).meta)["federated"]["step"] == 30


def test_per_tensor_batch_reads_back_as_one_scale_per_row():
    body = wire.decode_frame(batch("fp4", "tokens", codec.PER_TENSOR)).body
    tokens = 6
    per_block = wire.decode_frame(batch("fp4", "tokens")).body
    # Each tap's scales travel once: 2 bytes instead of tokens x 2 blocks x 2 bytes (hidden 64) and x 3 (96).
    assert len(per_block) - len(body) == tokens * (2 + 3) * 2 - 2 * 2
    rng = np.random.default_rng(7)
    for tap, hidden in zip(wire.Batch.from_body(body).taps, [64, 96]):
        enc = codec.encode(rng.standard_normal((tokens, hidden)).astype(np.float32), "fp4", codec.PER_TENSOR)
        assert tap.block_size == 0 and tap.scales.shape == (tokens, 1)
        assert np.array_equal(tap.scales, enc.scales) and np.array_equal(tap.decode(), codec.decode(enc))


def test_every_message_type_is_pinned():
    pinned = {wire.decode_frame(f(), wire.MAX_MODEL_FRAME).type for f in BUILDERS.values()}
    assert pinned | {wire.MsgType.HELLO} == set(wire.MsgType)
