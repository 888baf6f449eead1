"""bench/paper/compare.py's processes: each method's worker, each `trainer serve`, under a memory cap.

Every process runs under `prlimit --as` (`--mem-limit`), writes its log into <work>/logs, and is
stopped by its PID. A worker reads one spec file and writes one result file
(bench/paper/compare_workers.py); `trainer serve` listens on 127.0.0.1, and a CheckpointWatcher keeps
every checkpoint it writes for the curves.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from mobillm.bench.paper.compare_config import Settings
from mobillm.bench.paper.compare_report import brief
from mobillm.bench.server import TrainerServe
from mobillm.common.procfs import peak_rss_mb

WORKER = ["-m", "mobillm.bench.paper.compare_workers"]


def log(msg: str) -> None:
    print(f"[compare {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def limited(cmd: list[str], limit: int) -> list[str]:
    """`cmd` under an address-space cap (prlimit), so no method can take the machine down."""
    return ["prlimit", f"--as={limit}", "--"] + [str(c) for c in cmd]


def stop_process(proc: subprocess.Popen) -> None:
    """Terminate one child we started (by its PID), then kill it if it lingers."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(15)


class Harness:
    """Worker processes of one comparison: their specs, results and logs in the work folder."""

    def __init__(self, s: Settings, work: Path, engines: dict[str, Path], data: dict):
        self.s, self.work, self.engines, self.data = s, work, engines, data
        manifest = data["manifest"]
        self.config = manifest.config
        random_init = manifest.source == "random-init"
        self.common = {"engine": str(engines["fp32"]), "data": data["data"], "task": data["task"], "seed": s.seed,
                       "init_seed": manifest.seed if random_init else s.seed,
                       "pretrained": None if random_init else manifest.model_id,
                       "batch_size": s.batch_size, "max_len": s.max_len, "budget_s": s.budget_s,
                       "evals": s.evals, "eval_at_zero": not s.no_zero_eval, "threads": s.threads}

    def _spec(self, name: str, **fields) -> Path:
        spec = dict(self.common, out=str(self.work / f"{name}.result.json"), **fields)
        path = self.work / f"{name}.spec.json"
        path.write_text(json.dumps(spec))
        return path

    def reused(self, name: str, fields: dict) -> dict | None:
        """With --reuse: the earlier result of this worker when its spec is exactly the same."""
        spec, out = self.work / f"{name}.spec.json", self.work / f"{name}.result.json"
        if not (self.s.reuse and spec.is_file() and out.is_file()):
            return None
        same = json.loads(spec.read_text()) == dict(self.common, out=str(out), **fields)
        return json.loads(out.read_text()) if same else None

    def start(self, name: str, **fields) -> subprocess.Popen:
        """Start one worker on a spec of the common fields plus `fields`."""
        spec = self._spec(name, **fields)
        logf = open(self.work / "logs" / f"{name}.log", "w")
        proc = subprocess.Popen(limited([sys.executable, *WORKER, spec], self.s.mem_limit), stdout=logf,
                                stderr=subprocess.STDOUT)
        logf.close()
        return proc

    def finish(self, name: str, proc: subprocess.Popen, timeout: float, started: float | None = None) -> dict:
        """Wait for a worker; its result, or {"error": ...} with the last log line."""
        t0 = time.monotonic() if started is None else started
        load_before = os.getloadavg()[0]
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            peak = peak_rss_mb(proc.pid)
            stop_process(proc)
            return {"error": f"timed out after {timeout:.0f} s", "peak_rss_mb": peak}
        finally:
            stop_process(proc)
        out = self.work / f"{name}.result.json"
        if proc.returncode != 0 or not out.is_file():
            lines = (self.work / "logs" / f"{name}.log").read_text(errors="replace").strip().splitlines()
            return {"error": (lines or ["failed"])[-1][:300]}
        result = json.loads(out.read_text())
        result["wall_s"] = time.monotonic() - t0
        result["loadavg_1min"] = [load_before, os.getloadavg()[0]]  # other work on the machine, for the record
        return result

    def run(self, name: str, **fields) -> dict:
        """Run one worker to its end (or the timeout); its result."""
        return self.finish(name, self.start(name, **fields), self.s.timeout_s)


class TrainerProcess(TrainerServe):
    """`trainer serve` in its own process on 127.0.0.1 (a server's memory is not the device's), under
    the memory cap, launched at once: wait_ready before its first device."""

    def __init__(self, s: Settings, work: Path, name: str, cache: bool, checkpoint_every: int):
        args = ["--threads", s.server_threads, "--checkpoint-every", checkpoint_every, "--lr", s.lr_side,
                "--seed", s.seed, "--device", s.server_device] + (["--cache"] if cache else [])
        if cache and s.cache_select and not s.cache_epochs:  # cached epochs chosen on held-out cached samples
            args += ["--select-epochs", ",".join(map(str, s.cache_select))]
            if s.cache_select_lrs:
                args += ["--select-lrs", ",".join(f"{lr:g}" for lr in s.cache_select_lrs)]
            if s.cache_ensemble > 1:
                args += ["--ensemble", s.cache_ensemble]
        if cache and s.cache_replay:
            args += ["--replay", s.cache_replay]
        super().__init__(work / f"runs-{name}", *args, log=work / "logs" / f"server-{name}.log",
                         wrap=lambda cmd: limited(cmd, s.mem_limit))
        self.name = name
        shutil.rmtree(self.runs, ignore_errors=True)  # a --reuse rerun: the server's runs start afresh
        self.launch()
        self.ready = False

    def wait_ready(self, timeout: float = 120.0) -> float:
        """Block until the server listens (it fails fast if the process exits); once."""
        if not self.ready:
            super().wait_ready(timeout)
            self.ready = True
        return 0.0


class CheckpointWatcher(threading.Thread):
    """Hard-links each checkpoint.pt the server writes (it replaces the file atomically, so every
    version is a new inode) into its own snapshot folder with the run's config.json."""

    def __init__(self, run_dir: Path, snap_dir: Path):
        super().__init__(daemon=True, name="checkpoint-watcher")
        self.run_dir, self.snap_dir = run_dir, snap_dir
        shutil.rmtree(snap_dir, ignore_errors=True)  # a --reuse rerun's snapshots start afresh, as its server runs do
        self.snapshots: list[dict] = []
        self._seen: set[int] = set()
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(0.05):
            self.poll()
        self.poll()

    def poll(self) -> None:
        """Keep the current checkpoint if it is one not seen before."""
        ckpt = self.run_dir / "checkpoint.pt"
        try:
            inode = os.stat(ckpt).st_ino
            if inode in self._seen:
                return
            folder = self.snap_dir / f"c{len(self.snapshots):03d}"
            folder.mkdir(parents=True, exist_ok=True)
            os.link(ckpt, folder / "checkpoint.pt")
            shutil.copy2(self.run_dir / "config.json", folder / "config.json")
        except FileNotFoundError:  # not written yet, or replaced between stat and link: next poll
            return
        st = os.stat(folder / "checkpoint.pt")
        self._seen |= {inode, st.st_ino}
        self.snapshots.append({"folder": str(folder), "mtime": st.st_mtime})

    def stop(self) -> None:
        """Take a last look and end the thread."""
        self._done.set()
        self.join(10)


def run_jobs(h: Harness, jobs: list[tuple[str, dict]], parallel: int) -> dict:
    """Run worker processes, `parallel` at a time (1: one after the other, the measuring setting)."""
    pending, running, results = list(jobs), {}, {}
    try:
        while pending or running:
            while pending and len(running) < parallel:
                name, fields = pending.pop(0)
                reused = h.reused(name, fields)
                if reused is not None:
                    results[name] = reused
                    log(f"{name}: reused {h.work / f'{name}.result.json'} (--reuse, same spec)")
                    continue
                log(f"{name}: started")
                running[name] = (h.start(name, **fields), time.monotonic())
            if not running:
                continue
            done = next((n for n, (p, _) in running.items() if p.poll() is not None), None)
            if done is None:
                name, (proc, started) = next(iter(running.items()))
                try:  # block on the oldest; the others are checked again when it ends or after a second
                    proc.wait(1.0)
                except subprocess.TimeoutExpired:
                    if time.monotonic() - started < h.s.timeout_s:
                        continue
                done = name
            proc, started = running.pop(done)
            results[done] = h.finish(done, proc, max(1.0, h.s.timeout_s - (time.monotonic() - started)), started)
            log(f"{done}: {brief(results[done])}")
    finally:
        for proc, _ in running.values():
            stop_process(proc)
    return results
