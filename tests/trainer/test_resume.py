"""Checkpoints and resume: after a dropped connection or a server restart, training ends exactly where
an uninterrupted run ends (same weights), because samples_done is an exact position in the stream."""

from pathlib import Path

import torch

from mobillm.edge_runtime.simulate import SimDevice, SyntheticTask


def weights(server, run) -> dict:
    path = Path(server.config.runs_dir) / run / "checkpoint.pt"
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def device(server, taps, run):
    return SimDevice(server.url, SyntheticTask(taps, n_samples=96), run=run, device_id="phone", epochs=2, batch_size=8)


def check_resume_point(welcome: dict, sent_before: int, batch_size: int = 8) -> int:
    """The server trains every batch it received before answering; batches still in flight when the
    connection dropped may be lost, and then the device sends them again."""
    done = welcome["resume"]["samples_done"]
    assert sent_before - 2 * batch_size <= done <= sent_before and done % batch_size == 0, (done, sent_before)
    return done


def test_reconnect_after_drop_resumes_exactly(start_server, taps):
    server = start_server(checkpoint_every=5)
    reference = device(server, taps, "straight").run()
    first = device(server, taps, "dropped").run(stop_after_batches=7)  # closes without DONE
    assert first.samples_sent == 56
    second = device(server, taps, "dropped").run()
    done = check_resume_point(second.welcome, 56)
    assert second.samples_sent == 192 - done and second.done == reference.done
    assert same(weights(server, "dropped"), weights(server, "straight"))


def test_server_restart_resumes_from_checkpoint(start_server, taps, tmp_path):
    first_server = start_server(checkpoint_every=3)
    reference = device(first_server, taps, "straight").run()
    device(first_server, taps, "restarted").run(stop_after_batches=10)
    first_server.stop()  # checkpoints at the exact position

    plain = start_server()
    refused = device(plain, taps, "restarted").run()
    assert refused.error["code"] == "run_exists" and "--resume" in refused.error["message"]
    plain.stop()

    resumed = start_server(resume=True)
    result = device(resumed, taps, "restarted").run()
    check_resume_point(result.welcome, 80)
    assert result.done == reference.done
    assert same(weights(resumed, "restarted"), weights(resumed, "straight"))
    metrics = (Path(resumed.config.runs_dir) / "restarted" / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) == 24  # steps before the restart kept, none repeated


def test_cache_run_resumes_after_restart(start_server, taps):
    """Stop during cached epochs; the resumed server finishes them from the on-disk cache alone."""
    server = start_server(cache=True, checkpoint_every=2)
    data = SyntheticTask(taps, n_samples=64)
    reference = SimDevice(server.url, data, run="straight", device_id="phone", epochs=3, batch_size=8).run()
    partial = SimDevice(server.url, data, run="cached", device_id="phone", epochs=3, batch_size=8)
    partial.run(send_done=False)  # drop once stop_streaming came: the server holds the whole epoch
    server.stop()
    resumed = start_server(cache=True, resume=True)
    partial.url = resumed.url
    result = partial.run()
    assert result.welcome["stop_streaming"] and result.samples_sent == 0
    assert result.done == reference.done == {"samples_trained": 192, "steps": 24}
    assert same(weights(resumed, "cached"), weights(resumed, "straight"))


def test_finished_run_sends_its_model_again(start_server, taps):
    server = start_server()
    first = device(server, taps, "done").run()
    again = device(server, taps, "done").run()
    assert again.welcome["stop_streaming"] and again.samples_sent == 0
    assert again.model == first.model


def test_other_device_cannot_join_a_run(start_server, taps):
    server = start_server()
    device(server, taps, "mine").run(stop_after_batches=1)
    intruder = SimDevice(server.url, SyntheticTask(taps, n_samples=96), run="mine", device_id="other", epochs=2)
    assert intruder.run().error["code"] == "run_mismatch"


def test_crash_resumes_from_the_last_periodic_checkpoint(start_server, taps, tmp_path):
    """A copy of a live run folder is what a crash leaves: checkpoint at step 8, 10 steps trained.
    The resumed server restarts from step 8; the device re-sends from there; nothing is counted twice."""
    import shutil

    live = start_server(checkpoint_every=4)
    reference = device(live, taps, "straight").run()
    device(live, taps, "crashy").run(stop_after_batches=10)
    probe = device(live, taps, "crashy")
    assert check_resume_point(probe.run(stop_after_batches=0).welcome, 80) == 80  # all 10 trained (drained)
    crashed = tmp_path / "crashed"
    shutil.copytree(Path(live.config.runs_dir) / "crashy", crashed / "crashy")

    resumed = start_server(runs_dir=str(crashed), resume=True)
    result = device(resumed, taps, "crashy").run()
    assert result.welcome["resume"]["samples_done"] == 64 and result.samples_sent == 192 - 64
    assert result.done == reference.done
    assert same(weights(resumed, "crashy"), weights(live, "straight"))
    steps = [line for line in (crashed / "crashy" / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == 24
