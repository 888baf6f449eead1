"""edge-run serve: HTTP JSON predictions from a model loaded once, dynamic batching, one-line refusals."""

import http.client
import json
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from helpers import write_side

pytest.importorskip("onnx", exc_type=ModuleNotFoundError)

from mobillm.common.tasks import get_task  # noqa: E402
from mobillm.edge_runtime import cli  # noqa: E402
from mobillm.edge_runtime.bundle import BundleModel  # noqa: E402
from mobillm.edge_runtime.serve import PredictionService, ServeOptions  # noqa: E402


@pytest.fixture(scope="module")
def bundle(tiny_engine, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    side = write_side(tiny_engine, tmp / "side.onnx")
    assert cli.main(["bundle", "--engine", str(tiny_engine), "--side", str(side), "--out", str(tmp / "b")]) == 0
    return tmp / "b"


@pytest.fixture
def service(bundle):
    """A started service on 127.0.0.1 and a free port; stopped at the end of the test."""
    model = BundleModel(bundle)
    task = get_task("sst2")
    svc = PredictionService(model.tokenize, model.logits, task, task.class_names, {"model": "tiny"},
                            ServeOptions(port=0, max_body=4096, max_chars=500, max_batch=16, batch_wait_ms=5))
    port = svc.start()
    yield svc, port, model
    svc.stop()


def call(port: int, method: str, path: str, body: bytes | None = None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def test_predict_health_and_answers_equal_the_bundle(service):
    svc, port, model = service
    status, health = call(port, "GET", "/health")
    assert status == 200 and health["status"] == "ok" and health["labels"] == ["negative", "positive"]
    status, one = call(port, "POST", "/predict", json.dumps({"text": "a gripping, funny film"}).encode())
    want = model.logits([model.tokenize(("a gripping, funny film",))])[0]
    assert status == 200 and np.allclose(one["logits"], want, atol=1e-5)
    assert one["label"] == ["negative", "positive"][int(want.argmax())]
    assert abs(sum(one["probabilities"].values()) - 1) < 1e-5 and one["score"] == max(one["probabilities"].values())
    texts = ["ok", "the most boring two hours of my life", "fine"]
    status, many = call(port, "POST", "/predict", json.dumps({"texts": texts}).encode())
    assert status == 200 and [p["text"] for p in many["predictions"]] == texts


@pytest.mark.parametrize("body,status,words", [
    (b"{not json", 400, "not valid JSON"),
    (b'{"txt": "hi"}', 400, '"text"'),
    (b'{"texts": []}', 400, "non-empty list"),
    (b'{"texts": ["ok", 3]}', 400, "text 1 must be a string"),
    (json.dumps({"text": "x" * 600}).encode(), 413, "over 500 characters"),
    (json.dumps({"text": "x" * 5000}).encode(), 413, "over the 4096-byte limit"),
])
def test_bad_requests_get_one_line_and_the_service_keeps_serving(service, body, status, words):
    svc, port, _ = service
    got, reply = call(port, "POST", "/predict", body)
    assert got == status and words in reply["error"] and "\n" not in reply["error"]
    got, reply = call(port, "POST", "/predict", b'{"text": "still here"}')
    assert got == 200 and reply["label"] in ("negative", "positive")


def test_100_concurrent_requests_are_all_answered_in_batches(service, caplog):
    svc, port, model = service
    texts = [f"review number {i}: {'great' if i % 2 else 'awful'} movie" for i in range(100)]
    caplog.set_level("INFO", logger="mobillm.serve")
    with ThreadPoolExecutor(32) as pool:
        replies = list(pool.map(lambda t: call(port, "POST", "/predict", json.dumps({"text": t}).encode()), texts))
    assert all(status == 200 for status, _ in replies)
    assert [r["text"] for _, r in replies] == texts
    want = np.concatenate([model.logits([model.tokenize((t,))]) for t in texts[:5]])
    assert np.abs(np.array([r["logits"] for _, r in replies[:5]]) - want).max() < 1e-4
    batches = [int(m) for m in re.findall(r"batch=(\d+)", caplog.text)]
    assert len(batches) == 100 and max(batches) > 1, "no two requests were batched together"
    assert svc.served >= 100


def test_serve_command_binds_loopback_and_stops(tiny_engine, bundle, tmp_path):
    side = write_side(tiny_engine, tmp_path / "side.onnx")
    proc = subprocess.Popen([sys.executable, "-m", "mobillm.edge_runtime.cli", "serve", "--engine", str(tiny_engine),
                             "--side", str(side), "--port", "0"], stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        port = int(re.search(r"http://127\.0\.0\.1:(\d+)", line).group(1))
        status, reply = call(port, "POST", "/predict", b'{"text": "hi there"}')
        assert status == 200 and reply["label"] in ("negative", "positive")
        assert "POST /predict 200" in proc.stderr.readline()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_serve_refuses_a_side_of_another_task(tiny_engine, tmp_path, capsys):
    side = write_side(tiny_engine, tmp_path / "side.onnx", task="cola")
    assert cli.main(["serve", "--engine", str(tiny_engine), "--side", str(side), "--task", "sst2", "--port", "0"]) == 2
    assert "trained for task cola, not sst2" in capsys.readouterr().err
