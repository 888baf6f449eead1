"""What the device does when a connection fails (edge_runtime/failures.py), against real local
servers on 127.0.0.1: small WebSocket servers written here that answer as the trainer does (or as
a misconfigured one would), a TLS one with a certificate made in the test, and nothing at all.

Failures no retry can fix end the run at once with their cause; transient ones keep the back-off.
MODEL frames are accepted up to the protocol's limit and refused beyond it (the limits are
lowered here so the frames stay small)."""

import http
import json
import socket
import ssl
import threading
import time

import pytest
from helpers import make_certs, write_rows
from websockets.sync.server import serve

from mobillm.common import messages, wire
from mobillm.common.messages import ErrorReport, Hello, ModelMeta, TrainingDone, Welcome
from mobillm.common.netsim import free_port
from mobillm.common.tasks import get_task
from mobillm.edge_runtime import cli
from mobillm.edge_runtime.backbone import Backbone
from mobillm.edge_runtime.data import Example
from mobillm.edge_runtime.failures import ServerError
from mobillm.edge_runtime.stream import StreamClient, TrainOptions

FAST_RETRY = {"max_retries": 2, "retry_base_s": 0.01, "retry_max_s": 0.02, "connect_timeout_s": 5.0}


@pytest.fixture(scope="module")
def backbone(tiny_engine):
    return Backbone(tiny_engine, threads=1)


@pytest.fixture
def ws_server():
    """ws_server(handler, ssl=None, process_request=None) -> URL of a started websockets server."""
    servers = []

    def start(handler, ssl_context=None, process_request=None) -> str:
        server = serve(handler, "127.0.0.1", 0, ssl=ssl_context, process_request=process_request, compression=None)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"{'wss' if ssl_context else 'ws'}://127.0.0.1:{server.socket.getsockname()[1]}"

    yield start
    for server in servers:
        server.shutdown()


@pytest.fixture(scope="module")
def tls_context(tmp_path_factory):
    certs = make_certs(tmp_path_factory.mktemp("tls"))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(certs / "server.pem", certs / "server.key")
    return ctx, certs / "ca.pem"


def client(backbone, url, **opts) -> StreamClient:
    examples = [Example((f"a {'good' if i % 2 else 'bad'} movie",), i % 2) for i in range(8)]
    return StreamClient(backbone, examples, get_task("sst2"), TrainOptions(server=url, batch_size=4, progress=False,
                                                                           **{**FAST_RETRY, **opts}))


def fails_at_once(trainer: StreamClient, code: str) -> ServerError:
    t0 = time.perf_counter()
    with pytest.raises(ServerError) as err:
        trainer.run()
    assert err.value.code == code, err.value
    assert trainer.stats.reconnects == 0 and time.perf_counter() - t0 < 5
    assert trainer.stats.error == {"code": code, "message": str(err.value)}
    assert "\n" not in str(err.value)
    return err.value


def refuse(code: str, message: str, read_hello: bool = True, send_error: bool = True):
    """A handler that answers like the trainer's Session.fail: ERROR, then close 1008 with the code."""
    def handler(ws):
        if read_hello:
            ws.recv()
        if send_error:
            ws.send(messages.frame(ErrorReport(code, message)))
        ws.close(1008, code)
    return handler


def model_server(body_size: int):
    """A trainer that welcomes the device, stops its streaming at once and, on DONE, sends a MODEL of `body_size`."""
    def handler(ws):
        hello = Hello.from_meta(wire.decode_frame(ws.recv()).meta)
        ws.send(messages.frame(Welcome("s1", "r", 0, 0, False, True, 8)))
        assert wire.decode_frame(ws.recv()).type == wire.MsgType.DONE
        meta = ModelMeta({"pooling": "last"}, len(hello.taps), "sst2", "class", 2, "r", [], {"samples_trained": 8})
        try:
            ws.send(messages.frame(meta, bytes(body_size)))
            ws.send(messages.frame(TrainingDone(8, 1)))
            ws.recv(timeout=5)  # the device's BYE
        except Exception:  # the device refused the MODEL frame and closed
            pass
    return handler


@pytest.fixture
def small_limits(monkeypatch):
    """MODEL frames up to 4 MiB, other frames up to 1 MiB (the protocol's 256 / 64 MiB, scaled down)."""
    monkeypatch.setattr(wire, "DEFAULT_MAX_FRAME", 1 << 20)
    monkeypatch.setattr(wire, "MAX_MODEL_FRAME", 4 << 20)


def test_model_over_the_default_frame_limit_is_accepted(backbone, ws_server, small_limits):
    trainer = client(backbone, ws_server(model_server(3 << 20)))
    trainer.run()
    assert len(trainer.model_bytes) == 3 << 20 and trainer.stats.reconnects == 0


def test_model_over_the_protocol_limit_is_refused_at_once(backbone, ws_server, small_limits):
    err = fails_at_once(client(backbone, ws_server(model_server(5 << 20))), "model_too_big")
    assert str(4 << 20) in str(err) and "smaller" in str(err)


@pytest.mark.slow
def test_model_of_70_mib_is_accepted_at_the_real_limits(backbone, ws_server):
    trainer = client(backbone, ws_server(model_server(70 << 20)))
    trainer.run()
    assert len(trainer.model_bytes) == 70 << 20 > wire.DEFAULT_MAX_FRAME


@pytest.mark.parametrize("code, message, expect", [
    ("run_exists", "runs/r already holds a checkpoint; restart the server with --resume", "trainer serve --resume"),
    ("unauthorized", "missing or wrong token; ask the server's operator for it", "--token-file"),
    ("memory_budget", "a side network of 3.2 GB does not fit the budget", "3.2 GB does not fit"),  # a code unknown here
])
def test_server_refusals_end_the_run_at_once(backbone, ws_server, code, message, expect):
    err = fails_at_once(client(backbone, ws_server(refuse(code, message))), code)
    assert message in str(err) and expect in str(err)


@pytest.mark.parametrize("send_error", [True, False], ids=["error-frame", "close-only"])
def test_bad_path_reaches_the_device(backbone, ws_server, send_error):
    # The trainer refuses a wrong path before HELLO: the ERROR may arrive before the device has sent HELLO,
    # or be lost; the close code (1008, reason bad_path) says the same.
    url = ws_server(refuse("bad_path", "connect to path '/'", read_hello=False, send_error=send_error))
    err = fails_at_once(client(backbone, url + "/train"), "bad_path")
    assert "without a path" in str(err) and ("connect to path '/'" in str(err)) == send_error


@pytest.mark.parametrize("status, hint", [(403, "--token-file"), (404, "without a path"), (400, "trainer serve")])
def test_http_4xx_is_not_retried(backbone, ws_server, status, hint):
    url = ws_server(lambda ws: None, process_request=lambda conn, req: conn.respond(http.HTTPStatus(status), "no\n"))
    assert hint in str(fails_at_once(client(backbone, url), f"http_{status}"))


def test_plain_ws_to_a_tls_server_says_try_wss(backbone, ws_server, tls_context):
    url = ws_server(lambda ws: None, ssl_context=tls_context[0])
    err = fails_at_once(client(backbone, url.replace("wss://", "ws://")), "tls_expected")
    assert "is the server using TLS? try --server wss://127.0.0.1" in str(err)


def test_wss_to_a_plain_server_says_try_ws(backbone, ws_server, tls_context):
    url = ws_server(lambda ws: None)
    err = fails_at_once(client(backbone, url.replace("ws://", "wss://"), ca=str(tls_context[1])), "tls_unexpected")
    assert "try --server ws://127.0.0.1" in str(err)


def test_unknown_host_is_not_retried(backbone):
    err = fails_at_once(client(backbone, "ws://no-such-host.invalid:8765"), "dns")
    assert "no-such-host.invalid" in str(err)


def test_refused_connections_keep_the_back_off(backbone):
    trainer = client(backbone, f"ws://127.0.0.1:{free_port()}")
    with pytest.raises(ServerError, match="after 2 retries"):
        trainer.run()
    assert trainer.stats.reconnect_reasons == ["ConnectionRefusedError"] * 2
    assert trainer.stats.error["code"] == "unreachable"


def test_a_server_that_resets_connections_is_retried(backbone):
    # Accept, then close at once (a cut during the handshake): no TLS and no HTTP answer, so the probe
    # finds no mismatch and the device retries.
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def accept_and_close():
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                listener.accept()[0].close()
            except TimeoutError:
                pass

    thread = threading.Thread(target=accept_and_close, daemon=True)
    thread.start()
    try:
        trainer = client(backbone, f"ws://127.0.0.1:{listener.getsockname()[1]}")
        with pytest.raises(ServerError, match="after 2 retries"):
            trainer.run()
        assert trainer.stats.reconnects == 2 and trainer.stats.error["code"] == "unreachable"
    finally:
        stop.set()
        thread.join()
        listener.close()


@pytest.mark.parametrize("status", [503, 429])
def test_http_503_and_429_keep_the_back_off(backbone, ws_server, status):
    url = ws_server(lambda ws: None, process_request=lambda conn, req: conn.respond(http.HTTPStatus(status), "later\n"))
    trainer = client(backbone, url)
    with pytest.raises(ServerError, match="after 2 retries"):
        trainer.run()
    assert trainer.stats.reconnect_reasons == [f"HTTP {status}"] * 2


def test_run_exists_through_the_cli_writes_stats_and_says_how_to_resume(tiny_engine, ws_server, tmp_path, capsys):
    url = ws_server(refuse("run_exists", "runs/r already holds a checkpoint; restart the server with --resume"))
    stats = tmp_path / "stats.json"
    status = cli.main(["train", "--engine", str(tiny_engine), "--data", str(write_rows(tmp_path / "d.tsv", 8)),
                       "--task", "sst2", "--server", url, "--run", "r", "--stats-out", str(stats), "--threads", "1",
                       "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 2 and err[0].startswith("edge-run: 8 rows"), err  # the start line, then one
    assert err[1].startswith("edge-run: error: the server refused the session (run_exists)")
    assert "trainer serve --resume" in err[1] and "run this command again" in err[1]
    assert json.loads(stats.read_text())["error"]["code"] == "run_exists"


def redirecting(to: str | None = None, seen: list | None = None):
    """A front rank: reads HELLO, answers a WELCOME that redirects to `to` (None: to itself)."""
    def handler(ws):
        Hello.from_meta(wire.decode_frame(ws.recv()).meta)
        if seen is not None:
            seen.append(1)
        port = ws.local_address[1]
        ws.send(messages.frame(Welcome("s1", "r", 0, 0, False, False, 0, redirect=to or f"ws://127.0.0.1:{port}/")))
    return handler


def test_redirect_is_followed_at_once(backbone, ws_server, tmp_path):
    """A trainer of several ranks (docs/scale_out.md): WELCOME names the device's rank; it goes there
    without a back-off or a reconnect counted, and trains to the end."""
    from mobillm.trainer.config import ServerConfig
    from mobillm.trainer.server import TrainerServer

    with TrainerServer(ServerConfig(port=0, runs_dir=str(tmp_path / "runs"), threads=1)) as rank:
        seen = []
        front = ws_server(redirecting(rank.url, seen))
        trainer = client(backbone, front)
        stats = trainer.run()
    assert seen == [1] and stats.reconnects == 0 and trainer.model_bytes


def test_redirect_loop_fails_at_once(backbone, ws_server):
    err = fails_at_once(client(backbone, ws_server(redirecting())), "redirect_loop")
    assert "redirected this device 3 times" in str(err)


def test_redirect_from_tls_to_plain_is_refused(backbone, ws_server, tls_context):
    """A wss:// front that redirects to ws:// would have the device send its token in the clear."""
    ctx, ca = tls_context
    seen = []
    plain = ws_server(redirecting(None, seen))  # would take a HELLO if the device went there
    front = ws_server(redirecting(plain), ssl_context=ctx)
    err = fails_at_once(client(backbone, front, ca=str(ca)), "bad_redirect")
    assert "in the clear" in str(err) and seen == []


def test_failure_at_a_redirect_target_names_that_target(backbone, ws_server):
    """The rank a device was sent to cannot be resolved: the error names that host, not the front door's."""
    err = fails_at_once(client(backbone, ws_server(redirecting("ws://rank1.invalid:9/"))), "dns")
    assert "'rank1.invalid'" in str(err)


def test_the_simulated_device_follows_redirects_as_edge_run_does(ws_server):
    """SimDevice reads WELCOME through the same protocol core: a redirect loop ends it the same way."""
    from mobillm.edge_runtime.simulate import SimDevice, SyntheticTask

    device = SimDevice(ws_server(redirecting()), SyntheticTask([{"layer": 1, "hidden": 8, "fmt": "int8",
                                                                 "block_size": 8}], n_samples=4))
    with pytest.raises(ServerError, match="redirected this device 3 times") as err:
        device.run(timeout=10)
    assert err.value.code == "redirect_loop"
