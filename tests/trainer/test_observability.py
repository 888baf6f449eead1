"""TensorBoard event files, Prometheus /metrics and the status routes of a real TrainerServer; the status
page in a real headless Chromium (Selenium + chromedriver) while SimDevices stream.

The browser test skips, with the reason, where selenium or a Chromium + chromedriver pair is not
installed. Debian: `apt-get install chromium chromium-driver`; elsewhere point MOBILLM_CHROMIUM and
MOBILLM_CHROMEDRIVER at the two binaries. MOBILLM_STATUS_SCREENSHOT=docs/img/status_page.png keeps its
screenshot.
"""

import json
import logging
import os
import shutil
import threading
import time
import urllib.error
import urllib.request

import pytest

from mobillm.edge_runtime.simulate import SimDevice, SyntheticTask

TOKEN = "s3cret-token-value"


def get(server, path: str, token: str | None = None, port: int | None = None) -> tuple[int, str, bytes]:
    """(status, content type, body) of a plain HTTP GET to the server."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(f"http://127.0.0.1:{port or server.port}{path}", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read()


def slow_device(server, taps, n_samples: int, delay_s: float, **kwargs) -> SimDevice:
    """A SimDevice that takes `delay_s` to produce each batch (a phone's forward pass)."""
    device = SimDevice(server.url, SyntheticTask(taps, n_samples=n_samples), task="sst2", batch_size=8, **kwargs)
    make = device.frame_source

    def frame(seq, ids):
        time.sleep(delay_s)
        return make(seq, ids)

    device.frame_source = frame
    return device


def in_background(device) -> tuple[threading.Thread, dict]:
    out = {}
    thread = threading.Thread(target=lambda: out.setdefault("result", device.run()), daemon=True)
    thread.start()
    return thread, out


def wait_for(predicate, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def test_tensorboard_event_files_hold_the_logged_scalars(start_server, taps):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator", exc_type=ModuleNotFoundError)
    server = start_server()
    result = SimDevice(server.url, SyntheticTask(taps, n_samples=64), task="sst2", epochs=2, batch_size=16).run()
    assert result.error is None and result.done["steps"] == 8
    folder = server.config.runs_dir + "/" + result.welcome["run"]
    acc = event_accumulator.EventAccumulator(folder)
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "throughput/samples_per_s", "link/bytes_in", "link/queue_depth",
            "time/step_s", "eval/last_epoch_loss", "eval/last_epoch_accuracy"} <= tags
    steps = [json.loads(line) for line in open(f"{folder}/metrics.jsonl")]  # metrics.jsonl stays the record
    losses = acc.Scalars("train/loss")
    assert [s["step"] for s in steps] == list(range(1, 9))
    # At most one event per board.MIN_EVENT_S: a fast run's steps fold into fewer events, each holding
    # the values of the newest step it covers; the last step is always there.
    logged = [e.step for e in losses]
    assert logged == sorted(set(logged)) and logged[0] >= 1 and logged[-1] == 8
    assert [e.value for e in losses] == pytest.approx([steps[step - 1]["loss"] for step in logged])
    assert acc.Scalars("link/bytes_in")[-1].value == steps[-1]["bytes_received"]
    assert acc.Scalars("eval/last_epoch_accuracy")[0].value == result.model_meta["metrics"]["last_epoch_accuracy"]


def test_federated_tensorboard_has_per_device_throughput(start_server, taps):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator", exc_type=ModuleNotFoundError)
    server = start_server(federated=True)
    threads = [in_background(SimDevice(server.url, SyntheticTask(taps, n_samples=48, seed=i), task="sst2",
                                       batch_size=8, device_id=f"phone-{i}")) for i in range(2)]
    for thread, out in threads:
        thread.join(60)
        assert out["result"].error is None
    server.stop()  # closes the federated run's event file
    acc = event_accumulator.EventAccumulator(server.config.runs_dir + "/fed-sst2")
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"devices/phone-0/samples_per_s", "devices/phone-1/samples_per_s", "federated/share"} <= tags
    assert all(e.value > 0 for e in acc.Scalars("devices/phone-0/samples_per_s"))


def families(text: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    return {f.name: f for f in text_string_to_metric_families(text)}


def sample(fams: dict, family: str, name: str | None = None, default=None, **labels) -> float:
    """The value of one sample; `default` when it is not there (yet), else KeyError."""
    for s in fams[family].samples if family in fams else []:
        if s.name == (name or family) and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    if default is not None:
        return default
    raise KeyError((family, name, labels))


def test_metrics_scraped_during_a_real_run(start_server, taps):
    pytest.importorskip("prometheus_client", exc_type=ModuleNotFoundError)
    server = start_server(token=TOKEN)
    bad = SimDevice(server.url, SyntheticTask(taps, n_samples=8), token="wrong").run()
    assert bad.error["code"] == "unauthorized"
    device = slow_device(server, taps, n_samples=160, delay_s=0.02, token=TOKEN, run="scraped")
    thread, out = in_background(device)

    def scrape():
        status, ctype, body = get(server, "/metrics", TOKEN)
        assert status == 200 and ctype.startswith("text/plain")
        fams = families(body.decode())
        return fams if sample(fams, "mobillm_trainer_samples_trained", "mobillm_trainer_samples_trained_total",
                              default=0, run="scraped") > 0 else None

    fams = wait_for(scrape)  # mid-run: the device is still connected and streaming
    assert sample(fams, "mobillm_trainer_devices_connected") == 1
    assert sample(fams, "mobillm_trainer_runs", state="active") == 1
    assert sample(fams, "mobillm_trainer_bytes_received", "mobillm_trainer_bytes_received_total", run="scraped") > 0
    assert sample(fams, "mobillm_trainer_refused_connections", "mobillm_trainer_refused_connections_total",
                  reason="unauthorized") == 1
    assert sample(fams, "mobillm_trainer_step_seconds", "mobillm_trainer_step_seconds_count", run="scraped") >= 1
    assert sample(fams, "process_resident_memory_bytes") > 10e6
    assert "mobillm_trainer_queue_depth" in fams
    thread.join(60)
    assert out["result"].error is None
    fams = families(get(server, "/metrics", TOKEN)[2].decode())
    assert sample(fams, "mobillm_trainer_samples_trained", "mobillm_trainer_samples_trained_total",
                  run="scraped") == 160
    assert sample(fams, "mobillm_trainer_step_seconds", "mobillm_trainer_step_seconds_count", run="scraped") == 20
    assert sample(fams, "mobillm_trainer_runs", state="finished") == 1


def test_metrics_port_serves_the_same_registry(start_server, taps):
    pytest.importorskip("prometheus_client", exc_type=ModuleNotFoundError)
    server = start_server(metrics_port=0)
    assert server.http.metrics_port not in (None, server.port)
    result = SimDevice(server.url, SyntheticTask(taps, n_samples=32), task="sst2", batch_size=16).run()
    assert result.error is None
    fams = families(get(server, "/metrics", port=server.http.metrics_port)[2].decode())
    assert sample(fams, "mobillm_trainer_steps", "mobillm_trainer_steps_total", run=result.welcome["run"]) == 2


def test_status_routes_need_the_token_and_leak_nothing(start_server, taps):
    server = start_server(token=TOKEN)
    device = slow_device(server, taps, n_samples=96, delay_s=0.02, token=TOKEN, device_id="phone-7", run="page")
    thread, out = in_background(device)
    for path in ("/", "/status.json", "/metrics", "/status.json?token=wrong"):
        status, _, body = get(server, path)
        assert status == 401 and TOKEN.encode() not in body, path
    assert get(server, "/nope", TOKEN)[0] == 404 and get(server, "/status.json/x")[0] == 404
    status, ctype, page = get(server, f"/?token={TOKEN}")
    assert status == 200 and ctype.startswith("text/html") and b"status.json" in page and TOKEN.encode() not in page

    def running():
        snap = json.loads(get(server, "/status.json", TOKEN)[2])
        return snap if snap["devices"] and snap["runs"][0]["step"] > 0 else None

    snap = wait_for(running)
    assert get(server, f"/status.json?token={TOKEN}")[0] == 200
    run = snap["runs"][0]
    assert run["name"] == "page" and run["task"] == "sst2" and run["devices"] == ["phone-7"]
    assert run["state"] == "active" and 0 < run["progress"] < 1 and run["loss_curve"]
    assert snap["devices"][0]["device_id"] == "phone-7" and snap["devices"][0]["bytes_in"] > 0
    text = json.dumps(snap)
    assert TOKEN not in text and "127.0.0.1" not in text and "labels" not in text and "sample_ids" not in text
    assert set(snap["devices"][0]) == {"device_id", "run", "samples_trained", "progress", "last_seen_s",
                                       "connected_s", "bytes_in", "bytes_per_s", "metric"}
    thread.join(60)
    assert out["result"].error is None
    run = json.loads(get(server, "/status.json", TOKEN)[2])["runs"][0]
    assert run["state"] == "finished" and run["progress"] == 1 and "last_epoch_accuracy" in run["metric"]


def test_websocket_devices_still_connect_on_the_same_port(start_server, taps):
    """The HTTP routes answer plain GETs only: a device's upgrade to '/' goes through as before."""
    server = start_server()
    assert get(server, "/")[0] == 200
    result = SimDevice(server.url, SyntheticTask(taps, n_samples=16), batch_size=16).run()
    assert result.error is None and result.done["samples_trained"] == 16


# ---- the page in a real browser ----


def browser_paths() -> tuple[str, str]:
    chromium = os.environ.get("MOBILLM_CHROMIUM") or next(
        filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    driver = os.environ.get("MOBILLM_CHROMEDRIVER") or shutil.which("chromedriver")
    if chromium is None or driver is None:
        pytest.skip(f"no headless browser: chromium={chromium}, chromedriver={driver} (apt-get install chromium "
                    f"chromium-driver, or set MOBILLM_CHROMIUM and MOBILLM_CHROMEDRIVER)")
    return chromium, driver


@pytest.fixture
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed", exc_type=ModuleNotFoundError)
    chromium, driver = browser_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1300,640"):
        options.add_argument(arg)
    chrome = webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver), options=options)
    yield chrome
    chrome.quit()


def row_cells(browser, run: str) -> list[str] | None:
    """The text of each cell of the run's row on the page (None while it is not there), read in one
    script call: the page rebuilds its tables every second."""
    return browser.execute_script("const row = document.querySelector(`#runs tr[data-run='${arguments[0]}']`);"
                                  "return row ? Array.from(row.cells, c => c.textContent) : null;", run)


def step_of(browser, run: str) -> int:
    cells = row_cells(browser, run)
    return int(cells[6]) if cells else 0


@pytest.mark.slow
def test_status_page_shows_runs_and_their_progress_live(start_server, taps, browser, tmp_path):
    from selenium.webdriver.support.ui import WebDriverWait

    server = start_server(token=TOKEN)
    streams = [in_background(slow_device(server, taps, n_samples=480, delay_s=0.1, token=TOKEN, epochs=1,
                                         device_id=f"pixel-{i}", run=f"sst2-pixel-{i}")) for i in range(2)]
    browser.get(f"http://127.0.0.1:{server.port}/?token={TOKEN}")
    first = WebDriverWait(browser, 30, 0.05).until(lambda b: step_of(b, "sst2-pixel-0"))
    t0 = time.monotonic()  # progress shows on the page within 2 s of happening (the page polls every 1 s)
    WebDriverWait(browser, 2, 0.05).until(lambda b: step_of(b, "sst2-pixel-0") > first)
    assert time.monotonic() - t0 < 2
    devices = browser.execute_script("return Array.from(document.querySelectorAll('#devices tr[data-device]'), "
                                     "r => r.dataset.device).sort();")
    assert devices == ["pixel-0", "pixel-1"]
    cells = row_cells(browser, "sst2-pixel-0")
    assert cells[:2] == ["sst2-pixel-0", "sst2"] and cells[2] == "active (stream)" and cells[3] == "pixel-0"
    assert cells[4].endswith(" / 480")
    assert browser.execute_script("return document.querySelectorAll('#runs svg polyline').length;") == 2
    assert TOKEN not in browser.page_source and "127.0.0.1" not in browser.execute_script(
        "return document.body.innerText;")
    browser.save_screenshot(str(tmp_path / "status_page.png"))
    if os.environ.get("MOBILLM_STATUS_SCREENSHOT"):
        shutil.copy(tmp_path / "status_page.png", os.environ["MOBILLM_STATUS_SCREENSHOT"])
    assert (tmp_path / "status_page.png").stat().st_size > 10_000
    for thread, out in streams:
        thread.join(120)
        assert out["result"].error is None


def test_metrics_port_out_of_range_is_refused():
    from mobillm.trainer.config import ConfigError, ServerConfig

    with pytest.raises(ConfigError, match="metrics_port"):
        ServerConfig(metrics_port=70000).validate()


def test_answered_pages_stay_out_of_the_log_but_refusals_do_not(start_server, caplog):
    server = start_server(token=TOKEN)
    with caplog.at_level(logging.INFO, logger="websockets.server"):
        assert get(server, "/status.json", TOKEN)[0] == 200
        assert get(server, "/status.json")[0] == 401
    sent = [r.getMessage() for r in caplog.records if r.getMessage().startswith("HTTP response sent")]
    assert sent == ["HTTP response sent (401 Unauthorized)"]


def test_a_run_that_never_trains_starts_no_tensorboard_threads(start_server, taps):
    """A HELLO opens a run; its TensorBoard writer (and the writer's threads) wait for its first step."""
    from websockets.sync.client import connect

    from mobillm.common import wire

    server = start_server(tensorboard=True)
    for i in range(3):
        device = SimDevice(server.url, SyntheticTask(taps), task="sst2", device_id="d", run=f"hello-only-{i}")
        with connect(server.url) as ws:
            ws.send(wire.encode_frame(wire.MsgType.HELLO, device.hello()))
            assert wire.decode_frame(ws.recv(timeout=10)).type == wire.MsgType.WELCOME
    assert len(server.policy.runs) == 3
    names = [t.name for t in threading.enumerate()]
    assert not [n for n in names if n.startswith("tensorboard-")], names


def test_verbose_logging_never_prints_the_token(start_server, caplog):
    """`trainer serve -v` logs DEBUG, but not websockets' DEBUG lines: they hold the Authorization
    header and the status page's ?token= query."""
    from mobillm.trainer.cli import configure_logging

    websockets_logger = logging.getLogger("websockets")
    level = websockets_logger.level
    try:
        configure_logging(verbose=True)
        server = start_server(token=TOKEN)
        with caplog.at_level(logging.DEBUG):
            assert get(server, f"/status.json?token={TOKEN}", TOKEN)[0] == 200  # header and query
        assert caplog.records and TOKEN not in caplog.text
    finally:
        websockets_logger.setLevel(level)


def test_traces_of_runs_the_server_let_go_are_bounded(tmp_path):
    """A stream of new run names (issue 17's 10,000) cannot grow the status page's traces or the
    step-time series without bound: only held runs plus the last KEEP_GONE others are kept."""
    from types import SimpleNamespace

    from mobillm.trainer import status
    from mobillm.trainer.config import ServerConfig
    from mobillm.trainer.server import TrainerServer

    server = TrainerServer(ServerConfig(runs_dir=str(tmp_path / "runs"), port=0))
    held = SimpleNamespace(name="held")
    server.policy.runs["held"] = held
    server.http._trace(held)
    timers = []
    for i in range(status.KEEP_GONE + 50):
        gone = SimpleNamespace(name=f"gone-{i}")
        server.http._trace(gone)
        if server.http.metrics is not None:
            timers.append(server.http.metrics.observer(gone))
            timers[-1].step(gone, {"step_s": 0.01})
    names = list(server.http.traces)
    assert "held" in names and len(names) <= status.KEEP_GONE + 2
    assert f"gone-{status.KEEP_GONE + 49}" in names and "gone-0" not in names
    if server.http.metrics is not None:
        server.policy.runs.clear()  # the live collector reads real runs; the histogram is what is checked
        body = server.http.metrics.exposition()[0].decode()
        assert 'run="gone-0"' not in body and f'run="gone-{status.KEEP_GONE + 48}"' in body


def test_a_fast_loop_folds_its_steps_into_few_events(tmp_path):
    """500 steps queued at once become a handful of events (at most one per MIN_EVENT_S), each with
    the newest values; the last step and every device's latest rate survive the folding."""
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator", exc_type=ModuleNotFoundError)
    from types import SimpleNamespace

    from torch.utils.tensorboard import SummaryWriter

    from mobillm.trainer.board import RunBoard

    board = RunBoard(lambda: SummaryWriter(str(tmp_path), flush_secs=1))
    for step in range(1, 501):
        board.step(None, {"step": step, "time": 1000.0 + step, "loss": 1.0 / step, "device": f"d{step % 2}",
                          "device_samples": 8 * step})
    board.end(SimpleNamespace(folder=tmp_path, step=500))
    acc = event_accumulator.EventAccumulator(str(tmp_path))
    acc.Reload()
    losses = acc.Scalars("train/loss")
    assert 1 <= len(losses) < 50 and losses[-1].step == 500 and losses[-1].value == pytest.approx(1 / 500)
    assert {"devices/d0/samples_per_s", "devices/d1/samples_per_s"} <= set(acc.Tags()["scalars"])
