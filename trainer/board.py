"""TensorBoard event files in each run's folder, next to metrics.jsonl (which stays the machine-readable record).

A `RunBoard` watches one `training.TrainingRun`: every step record becomes scalars (loss, lr,
samples/s, bytes in, queue depth, step time; in federated runs each device's throughput too), and
the run's summary.json (the last epoch's metric) is added when its training thread ends, so
`tensorboard --logdir runs/` shows every run with no extra step. Needs the `tensorboard` package
(`pip install mobillm[observability]`); without it the server logs one notice and writes none.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from pathlib import Path

from .core import SUMMARY

log = logging.getLogger("mobillm.trainer")

# metrics.jsonl field -> TensorBoard tag.
SCALARS = {"loss": "train/loss", "lr": "train/lr", "align_lr": "train/align_lr", "grad_norm": "train/grad_norm",
           "samples_per_s": "throughput/samples_per_s", "bytes_received": "link/bytes_in",
           "queue_depth": "link/queue_depth", "step_s": "time/step_s", "wait_s": "time/wait_s",
           "idle_frac": "time/idle_frac", "epoch": "train/epoch", "staleness": "federated/staleness",
           "share": "federated/share"}
FLUSH_SECS = 2  # TensorBoard sees a step within about this long
MIN_EVENT_S = 0.1  # at most ~10 events a second per run (bench/micro/trainer.py --observe-rounds)


def board_factory():
    """`make(run) -> RunBoard` when tensorboard is installed, else None (after one notice in the log)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        log.warning("TensorBoard event files off: %s (pip install 'mobillm[observability]')", exc)
        return None
    return lambda run: RunBoard(lambda: SummaryWriter(str(run.folder), flush_secs=FLUSH_SECS), run.name)


class RunBoard:
    """One run's event file. The training thread only queues each record (`step`); the board's own
    thread turns them into TensorBoard events, at most one per MIN_EVENT_S (building protobufs costs ~0.1 ms, 13 x
    `add_scalar` ~2 ms: too much for the loop). `end` when the run's training thread ends.
    `make_writer()` (a SummaryWriter, which starts a thread of its own) and the board's thread are
    started by the first record: a run that never trains (a HELLO, then nothing) costs no threads."""

    def __init__(self, make_writer, name: str = "run"):
        self._make_writer, self.writer = make_writer, None
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._device_last: dict[str, tuple[float, int]] = {}  # device -> (time, its samples trained) at its last step
        self._thread = threading.Thread(target=self._write_loop, name=f"tensorboard-{name}", daemon=True)

    def _put(self, item) -> None:
        if self.writer is None:  # called by one thread only: the run's training thread
            self.writer = self._make_writer()
            self._thread.start()
        self._queue.put(item)

    def step(self, run, record: dict) -> None:
        self._put((record["step"], record["time"], self._scalars(record)))

    def end(self, run) -> None:
        """The run's training thread ended: its summary's numbers (last-epoch loss and metric) join, then close."""
        summary = {f"eval/{k}": v for k, v in read_summary(run.folder).items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if summary:
            self._put((run.step, None, summary))
        if self.writer is None:
            return
        self._queue.put(None)
        self._thread.join()
        self.writer.close()

    def _scalars(self, record: dict) -> dict:
        """TensorBoard tag -> value for one metrics.jsonl record."""
        out = {tag: record[key] for key, tag in SCALARS.items() if isinstance(record.get(key), (int, float))}
        device = record.get("device")
        if device is not None:  # federated: this device's samples per second since its previous step
            last = self._device_last.get(device)
            now, done = record["time"], record["device_samples"]
            if last is not None and now > last[0]:
                out[f"devices/{device}/samples_per_s"] = (done - last[1]) / (now - last[0])
            self._device_last[device] = (now, done)
        return out

    def _write_loop(self) -> None:
        """At most one event per MIN_EVENT_S: the records that queued meanwhile are folded into one
        (each tag's newest value, the newest step), so a fast loop (hundreds of steps a second) pays
        for ~10 protobufs a second, not one per step. metrics.jsonl keeps every step."""
        from tensorboard.compat.proto.summary_pb2 import Summary

        file_writer = self.writer._get_file_writer()

        def write(step, walltime, scalars) -> float:
            values = [Summary.Value(tag=tag, simple_value=float(v)) for tag, v in scalars.items()]
            file_writer.add_summary(Summary(value=values), step, walltime)
            return time.monotonic()

        last = 0.0
        while (item := self._queue.get()) is not None:
            time.sleep(max(last + MIN_EVENT_S - time.monotonic(), 0.0))
            step, walltime, scalars = item[0], item[1], dict(item[2])
            end = False
            while not end:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None or nxt[1] is None:  # the end, or the run's summary: written on their own
                    last = write(step, walltime, scalars)
                    if nxt is None:
                        end = True
                    else:
                        step, walltime, scalars = nxt[0], nxt[1], dict(nxt[2])
                    continue
                step, walltime = nxt[0], nxt[1]
                scalars.update(nxt[2])
            if end:
                return
            last = write(step, walltime, scalars)


def read_summary(folder: Path) -> dict:
    """summary.json of a run folder ({} when there is none yet)."""
    path = Path(folder) / SUMMARY
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
