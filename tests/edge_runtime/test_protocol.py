"""The device's protocol core (edge_runtime/protocol.py) driven by frames alone: no socket, no server."""

from __future__ import annotations

import pytest

from mobillm.common import messages, wire
from mobillm.common.messages import BitPlan, Credit, ErrorReport, ModelMeta, ProtocolError, TrainingDone, Welcome
from mobillm.edge_runtime.failures import ServerError
from mobillm.edge_runtime.protocol import (MAX_REDIRECTS, Credited, DeviceSession, Finished, Ledger, ModelReceived,
                                           Phase, Planned, Redirected, Refused, Sent, Welcomed, read_frame,
                                           resume_point)

SERVER = "ws://127.0.0.1:8765/"
HELLO = {"device_id": "phone"}


def frame(message, body: bytes = b"") -> wire.Frame:
    return read_frame(messages.frame(message, body))


def welcome(samples_done: int = 0, credits: int = 2, stop: bool = False, redirect: str | None = None) -> wire.Frame:
    return frame(Welcome("s1", "r", credits, samples_done, False, stop, 64, redirect=redirect))


def model() -> wire.Frame:
    meta = ModelMeta({"pooling": "last"}, 1, "sst2", "class", 2, "r", [], {"samples_trained": 64})
    return frame(meta, b"onnx")


def opened(url: str = SERVER) -> DeviceSession:
    session = DeviceSession(url)
    hello = read_frame(session.open(HELLO))
    assert hello.type == wire.MsgType.HELLO and hello.meta == HELLO and session.phase is Phase.HANDSHAKE
    return session


def test_a_whole_session_in_order():
    session = opened()
    event = session.receive(welcome(credits=2))
    assert isinstance(event, Welcomed) and event.welcome.samples_done == 0
    assert session.phase is Phase.STREAMING and session.credits == 2
    assert session.take_credit() and session.take_credit() and not session.take_credit()  # then wait for CREDIT
    event = session.receive(frame(Credit(1, 0, 16)))
    assert isinstance(event, Credited) and event.credit.acked_seq == 0 and session.credits == 1
    assert isinstance(session.receive(frame(BitPlan([0.5, 0.25], 3))), Planned)
    done = read_frame(session.finish(64))
    assert done.type == wire.MsgType.DONE and done.meta == {"samples": 64} and session.phase is Phase.FINISHING
    event = session.receive(model())
    assert isinstance(event, ModelReceived) and session.model == b"onnx" and session.model_meta["run"] == "r"
    event = session.receive(frame(TrainingDone(64, 4)))
    assert isinstance(event, Finished) and event.done == TrainingDone(64, 4) and session.phase is Phase.FINISHED
    assert read_frame(session.bye()).type == wire.MsgType.BYE


def test_only_welcome_or_error_answers_hello():
    with pytest.raises(ServerError, match="expected WELCOME, got CREDIT"):
        opened().receive(frame(Credit(1, 0, 16)))


@pytest.mark.parametrize("stage", ["handshake", "streaming", "finishing"])
def test_error_frames_refuse_at_every_stage(stage):
    session = opened()
    if stage != "handshake":
        session.receive(welcome())
    if stage == "finishing":
        session.finish(64)
    report = ErrorReport(messages.OVER_BUDGET, "no room")
    event = session.receive(frame(report))
    assert isinstance(event, Refused) and event.report == report and event.meta == report.to_meta()
    assert session.phase is Phase.REFUSED


def test_done_before_the_model_breaks_the_protocol():
    session = opened()
    session.receive(welcome())
    with pytest.raises(ServerError, match="without sending the side network"):
        session.receive(frame(TrainingDone(64, 4)))


def test_malformed_metas_are_protocol_errors():
    session = opened()
    session.receive(welcome())
    with pytest.raises(ProtocolError):
        session.receive(read_frame(wire.encode_frame(wire.MsgType.CREDIT, {"credits": -1})))
    with pytest.raises(ProtocolError):
        session.receive(read_frame(wire.encode_frame(wire.MsgType.MODEL, {"config": {}}, b"x")))


def test_frames_the_device_has_no_use_for_are_ignored():
    session = opened()
    session.receive(welcome())
    assert session.receive(read_frame(wire.encode_frame(wire.MsgType.BYE))) is None


def test_stop_streaming_from_welcome_or_credit():
    session = opened()
    session.receive(welcome(stop=True))
    assert session.stop_streaming
    session = opened()
    session.receive(welcome())
    session.receive(frame(Credit(1, 3, 64, stop_streaming=True)))
    assert session.stop_streaming
    session.receive(frame(Credit(1, 4, 64)))  # stays stopped for this connection
    assert session.stop_streaming
    session.lost()
    session.open(HELLO)
    assert not session.stop_streaming and session.credits == 0  # a new connection starts afresh


def test_redirect_is_followed_and_a_reconnect_asks_the_server_again():
    session = opened()
    event = session.receive(welcome(redirect="ws://rank1:9/"))
    assert event == Redirected("ws://rank1:9/") and session.url == "ws://rank1:9/"
    assert session.phase is Phase.REDIRECTED and session.redirects == 1
    session.open(HELLO)
    assert isinstance(session.receive(welcome()), Welcomed) and session.redirects == 0
    session.lost()
    assert session.url == SERVER


def test_redirect_loop_ends_the_run():
    session = DeviceSession(SERVER)
    for _ in range(MAX_REDIRECTS):
        session.open(HELLO)
        assert isinstance(session.receive(welcome(redirect=SERVER)), Redirected)
    session.open(HELLO)
    with pytest.raises(ServerError, match=f"{MAX_REDIRECTS} times in a row") as err:
        session.receive(welcome(redirect=SERVER))
    assert err.value.code == "redirect_loop"


@pytest.mark.parametrize("url", ["http://rank1:9/", "not a url"])
def test_redirect_to_a_bad_url_ends_the_run(url):
    with pytest.raises(ServerError, match="bad URL") as err:
        opened().receive(welcome(redirect=url))
    assert err.value.code == "bad_redirect"


def test_redirect_from_tls_to_plain_is_refused():
    session = opened("wss://front:443/")
    with pytest.raises(ServerError, match="in the clear") as err:
        session.receive(welcome(redirect="ws://rank1:9/"))
    assert err.value.code == "bad_redirect"
    assert isinstance(opened("wss://front:443/").receive(welcome(redirect="wss://rank1:9/")), Redirected)


def test_progress_is_a_new_resume_point_or_a_credit():
    session = opened()
    session.receive(welcome(samples_done=0))
    assert not session.lost()  # nothing acknowledged: a fruitless attempt
    session.open(HELLO)
    session.receive(welcome(samples_done=32))
    assert session.lost() and not session.lost()  # a resume point further on; reported once
    session.open(HELLO)
    session.receive(welcome(samples_done=32))
    assert not session.lost()  # the same resume point again
    session.open(HELLO)
    session.receive(welcome(samples_done=32))
    session.receive(frame(Credit(1, 2, 48)))
    assert session.lost()


def test_the_side_network_outlives_a_lost_connection():
    session = opened()
    session.receive(welcome())
    session.finish(64)
    session.receive(model())
    session.lost()  # cut before the server's DONE
    session.open(HELLO)
    session.receive(welcome(samples_done=64))
    assert isinstance(session.receive(frame(TrainingDone(64, 4))), Finished)


def sent(seq: int, start: int, n: int = 8) -> Sent:
    return Sent(seq, start + n, b"batch-%d" % seq, n)


def test_ledger_forgets_what_the_server_acknowledged():
    ledger = Ledger()
    for seq in range(4):
        ledger.sent(sent(seq, seq * 8))
    assert ledger.next_sample == 32 and ledger.retained_from() == 0
    ledger.acknowledge(acked_seq=0)
    assert [s.seq for s in ledger.unacked] == [1, 2, 3] and ledger.retained_from() == 8
    ledger.acknowledge(samples_done=24)  # a WELCOME's resume point
    assert [s.seq for s in ledger.unacked] == [3] and ledger.retained_from() == 24
    ledger.acknowledge(acked_seq=3)
    assert not ledger.unacked and ledger.retained_from() == 32
    ledger.restart(16)  # the server resumed from an older checkpoint: compute from sample 16 again
    assert ledger.next_sample == 16 and ledger.retained_from() == 16


def test_resume_point_is_a_batch_boundary():
    sizes = [8, 8, 4]
    assert resume_point(sizes, 0) == (0, 0)
    assert resume_point(sizes, 16) == (2, 16)
    assert resume_point(sizes, 20) == (3, 20)  # all done
    with pytest.raises(ServerError, match="not a batch boundary"):
        resume_point(sizes, 12)
