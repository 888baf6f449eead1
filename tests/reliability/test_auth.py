"""Auth and per-run isolation. The token compare is constant-time; refused sessions leave nothing
behind; a device cannot read or write a run started by another task, manifest, device or tap
layout, and the owner's run is untouched by the attempts.

Wrong or missing token -> `unauthorized` and run names that are paths (`../escape`) -> `bad_hello`
are also in tests/trainer/test_bad_frames.py::test_bad_hello; `trainer serve --token-file` over
TLS, end to end with `edge-run`, is in test_tls.py."""

import hmac
import time

import pytest

pytest.importorskip("torch", exc_type=ModuleNotFoundError)

from mobillm.edge_runtime.simulate import SimDevice, SyntheticTask  # noqa: E402
from mobillm.trainer.config import ServerConfig  # noqa: E402
from mobillm.trainer.run import read_trained_ids  # noqa: E402
from mobillm.trainer.server import TrainerServer  # noqa: E402

pytestmark = pytest.mark.slow  # real servers, processes or builds: the `-m "not slow"` loop skips them

TAPS = [{"layer": 1, "hidden": 32, "fmt": "nf4", "block_size": 16},
        {"layer": 2, "hidden": 16, "fmt": "int8", "block_size": 16}]
TOKEN = "a-long-random-token-3f9c2e"


@pytest.fixture
def server(tmp_path):
    srv = TrainerServer(ServerConfig(port=0, runs_dir=str(tmp_path / "runs"), token=TOKEN, threads=1))
    srv.start()
    yield srv
    srv.stop()


def sim(server, run, token=TOKEN, **kw) -> SimDevice:
    data = SyntheticTask(TAPS, n_samples=kw.pop("n_samples", 32))
    return SimDevice(server.url, data, run=run, device_id=kw.pop("device_id", "owner"), token=token, **kw)


def test_token_is_compared_in_constant_time(server, tmp_path, monkeypatch, report):
    calls = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((type(a), type(b)))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    for token, run in ((None, "no-token"), ("a-long-random-token-3f9c2f", "near-miss"), ("\ud800", "bad-utf8")):
        assert sim(server, run, token=token).run().error["code"] == "unauthorized"
    assert calls == [(bytes, bytes)] * 3  # every HELLO went through hmac.compare_digest, on bytes
    runs = tmp_path / "runs"
    assert not any((runs / name).exists() for name in ("no-token", "near-miss", "bad-utf8"))  # nothing left behind
    assert sim(server, "with-token").run().done["samples_trained"] == 32
    report(auth="hmac.compare_digest", refused=["no token", "wrong token", "invalid UTF-8 token"])


def test_a_device_cannot_read_or_write_another_tasks_run(server, tmp_path, report):
    owner = sim(server, "owner-run", epochs=2, batch_size=8)
    owner.run(stop_after_batches=2)  # the run exists, half done
    folder = tmp_path / "runs" / "owner-run"
    deadline = time.monotonic() + 30
    while (folder / "trained_ids.jsonl").read_text().count("\n") < 2 and time.monotonic() < deadline:
        time.sleep(0.01)  # the server trains the two batches it received
    config_before = (folder / "config.json").read_bytes()
    trained_before = (folder / "trained_ids.jsonl").read_bytes()

    intruders = {
        "another task": dict(task="cola"),
        "another manifest": dict(manifest_sha256="cd" * 32),
        "another device": dict(device_id="intruder"),
        "another tap layout": dict(taps=[dict(TAPS[0], layer=5), TAPS[1]]),
        "another label count": dict(num_labels=3),
    }
    for what, change in intruders.items():
        intruder = sim(server, "owner-run", epochs=2, batch_size=8, device_id=change.pop("device_id", "owner"))
        hello = {**intruder.hello(), **change}
        intruder.hello = lambda hello=hello: hello
        result = intruder.run()
        assert result.error and result.error["code"] == "run_mismatch", (what, result.error)
        assert result.samples_sent == 0 and result.model is None, what

    # The owner's run is as it was, and finishes exactly.
    assert (folder / "config.json").read_bytes() == config_before
    assert (folder / "trained_ids.jsonl").read_bytes() == trained_before
    done = owner.run()
    assert done.done["samples_trained"] == 64
    assert all(sorted(ids) == list(range(32)) for ids in read_trained_ids(folder).values())

    # A finished run sends its model only to a HELLO that matches it.
    thief = sim(server, "owner-run", epochs=2, batch_size=8)
    hello = {**thief.hello(), "task": "mrpc"}
    thief.hello = lambda: hello
    assert thief.run().error["code"] == "run_mismatch" and thief.run().model is None
    report(isolation="run_mismatch", refused=sorted(intruders) + ["model of a finished run"])
