"""Baselines in one harness: Full-FT, LoRA, BitFit, split learning, MobiLLM-L and mobillm.

    python bench/compare.py --model opt-350m --task sst2 --batch-size 16 --max-len 128 --budget-minutes 2

Every method runs in its own fresh process (bench/compare_workers.py) under an address-space
limit, on the same training rows in the same batch order (the device's own length-bucketed
plan, `edge_runtime.stream.plan_batches`), with a random-init backbone built from the same
config and seed. Per method: device peak RSS (VmHWM), device compute seconds per iteration,
bytes per sample on the link, the dev metric against wall-clock, the time to reach a target
metric and the metric after the budget. Evaluation pauses each method's clock.

The target is `--target-frac` x the best metric after the budget. A time-to-target ratio is only
reported when it means something: not when the target is not above a method's untrained
(t = 0) metric, and not when the best method ended within two binomial standard errors of the
best untrained accuracy (a random-init backbone on real GLUE data, for one); the table says
"not measurable" and why. `--summarize-only` rebuilds table, JSON and plot from a finished
run's `--work` folder.

- full / lora / lora64 / bitfit: the engine's model as AutoModelForSequenceClassification in torch,
  AdamW (LoRA: PEFT r 16 or r 64 on q_proj,v_proj; BitFit: biases, or norm scales for bias-free Gemma).
- split: the same classifier cut after `--split-layer`; device memory and device s/iter come from a
  separate process that holds only embeddings + the lower layers and runs their forward and
  backward; the accuracy run holds both halves in one process and adds the link time of the cut
  activation (up) and its gradient (down), fp32 and padded like the batch, at `--link-mbps`.
- mobillm-local (MobiLLM-L): ORT backbone + the side network trained in torch in the device process.
- mobillm-*: `StreamClient` (edge-run train) against a `trainer serve` process; pooled, tokens,
  pooled with the server's `--cache`, pooled through a proxy that limits the uplink to
  `--link-mbps`, and pooled on an engine exported with `--weights int8`. The server only returns
  the side network at the end, so the curve is built from the server's checkpoints (copied as
  they are written, turned into ONNX with `trainer export`'s function) plus the returned model,
  all scored on the device's path (JointModel). Each server gets one untimed warm-up run.

Reproduce the paper's setting with real weights (a machine with internet; a GPU for the server):
    python bench/compare.py --model facebook/opt-1.3b --server-device cuda --train-rows 67349 \
        --dev-rows 872 --budget-minutes 60
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from device_memory import TOKENIZER, free_port
from mobillm.common.netsim import LinkProxy

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "compare_workers.py"
GLUE = ROOT.parent / "shared" / "data" / "glue"
GLUE_DIRS = {"sst2": "SST-2", "cola": "CoLA", "mrpc": "MRPC", "stsb": "STS-B", "rte": "RTE", "qnli": "QNLI"}
METHODS = {
    "full": "Full fine-tuning (torch, AdamW)",
    "lora": "LoRA (PEFT, r 16, q_proj/v_proj)",
    "lora64": "LoRA (PEFT, r 64, q_proj/v_proj)",
    "bitfit": "BitFit (biases + head)",
    "split": "Split learning (device: embeddings + lower layers, fwd + bwd)",
    "mobillm-local": "MobiLLM-L (ORT backbone + side network on the device)",
    "mobillm-pooled": "mobillm, pooled",
    "mobillm-tokens": "mobillm, tokens",
    "mobillm-cache": "mobillm, pooled + server --cache",
    "mobillm-60mbps": "mobillm, pooled, uplink throttled",
    "mobillm-int8": "mobillm, pooled, engine with int8 weights (README's deployment)",
    "mobillm-int4": "mobillm, pooled, engine with int4 weights (MatMulNBits, weight-only)",
}
# mode, server --cache, throttled uplink, engine weights
SERVER_VARIANTS = {"mobillm-pooled": ("pooled", False, False, "fp32"), "mobillm-tokens": ("tokens", False, False, "fp32"),
                   "mobillm-cache": ("pooled", True, False, "fp32"), "mobillm-60mbps": ("pooled", False, True, "fp32"),
                   "mobillm-int8": ("pooled", False, False, "int8"), "mobillm-int4": ("pooled", False, False, "int4")}
PLAN_EPOCHS = 100  # batches planned for the time-budgeted methods (they stop at the budget)


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


def vmhwm_of(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


# ----------------------------------------------------------------------------- engine and data

def real_weights(model: str) -> bool:
    """An HF id (org/name), a checkpoint folder or a GGUF (gemma-3-270m, path.gguf): real weights.
    Another short name (opt-350m): random init."""
    from mobillm.export.gguf import is_gguf_name

    return "/" in model or Path(model).is_dir() or is_gguf_name(model)


def ensure_engine(a, work: Path, weights: str = "fp32") -> Path:
    """The engine for --model/--set/--seed with `weights`, exported once into --engines (or as given
    by --engine / --engine-int8 / --engine-int4)."""
    given = getattr(a, "engine" if weights == "fp32" else f"engine_{weights}")
    if given is not None:
        if not (given / "manifest.json").is_file():
            raise SystemExit(f"compare: engine {given} has no manifest.json")
        return given.resolve()
    if a.engine is not None:
        raise SystemExit(f"compare: with --engine, give the {weights} engine too (--engine-{weights}) or drop "
                         f"mobillm-{weights}")
    key = json.dumps([a.model, sorted(a.overrides), a.seed, a.quant], sort_keys=True)
    tag = Path(a.model).name + ("" if not a.overrides and not a.seed else f"-{hashlib.sha1(key.encode()).hexdigest()[:8]}")
    out = a.engines / f"{tag}-{a.quant}-{weights}"
    if (out / "manifest.json").is_file():
        return out
    cmd = [sys.executable, "-c", "import sys; from mobillm.export.cli import main; sys.exit(main())", a.model,
           "--out", out, "--weights", weights, "--quant", a.quant, "--seed", a.seed, "--quiet"]
    cmd += [] if real_weights(a.model) else ["--random-init"]
    # Real weights bring their own tokenizer; random-init OPT borrows the shared OPT one.
    tokenizer = a.tokenizer or (TOKENIZER if TOKENIZER.is_dir() and not real_weights(a.model) else None)
    cmd += ["--tokenizer", tokenizer] if tokenizer else []
    for item in a.overrides:
        cmd += ["--set", item]
    log(f"exporting the engine: {' '.join(str(c) for c in cmd[3:])}")
    with open(work / "logs" / f"export-{weights}.log", "w") as f:
        subprocess.run(limited(cmd, a.mem_limit), check=True, stdout=f, stderr=subprocess.STDOUT)
    return out


def subset_file(src: Path, dest: Path, rows: int, seed: int, has_header: bool) -> Path:
    """`rows` random lines of a TSV (header kept), written as they are (GLUE quoting untouched)."""
    lines = src.read_text(encoding="utf-8").splitlines()
    header, body = (lines[:1], lines[1:]) if has_header else ([], lines)
    body = [ln for ln in body if ln.strip()]
    pick = np.random.default_rng(seed).permutation(len(body))[: min(rows, len(body))]
    dest.write_text("\n".join(header + [body[i] for i in pick]) + "\n", encoding="utf-8")
    return dest


def prepare_data(a, engine: Path, work: Path) -> dict:
    """Train/dev subsets (files for the device) and their token ids + batch plans (data.npz for the rest)."""
    from mobillm.common.sample import write_sample
    from mobillm.common.tasks import get_task
    from mobillm.common.tokenize import EngineTokenizer
    from mobillm.edge_runtime.data import load_examples
    from mobillm.edge_runtime.stream import plan_batches
    from mobillm.common.manifest import Manifest

    task = get_task(a.task)
    folder = a.data_dir or GLUE / GLUE_DIRS.get(task.name, task.name)
    train_src, dev_src = folder / "train.tsv", folder / "dev.tsv"
    if not (train_src.is_file() and dev_src.is_file()):
        if task.name != "sst2":
            raise SystemExit(f"compare: no {train_src} / {dev_src}; pass --data-dir")
        log(f"{folder} not found: using the built-in sentiment sample (mobillm.common.sample)")
        train_src = write_sample(work / "sample_train.tsv", a.train_rows, a.seed)
        dev_src = write_sample(work / "sample_dev.tsv", a.dev_rows, a.seed + 1)
    train_file = subset_file(train_src, work / "train.tsv", a.train_rows, a.seed, task.has_header)
    dev_file = subset_file(dev_src, work / "dev.tsv", a.dev_rows, a.seed, task.has_header)
    manifest = Manifest.load(engine, verify=False)
    tok = EngineTokenizer(engine / manifest.tokenizer_dir, manifest.token_rules)
    limit = min(a.max_len, manifest.max_length)  # as Backbone.tokenize truncates

    def encode(path: Path):
        examples = load_examples(path, task)
        rows = [np.asarray(tok.encode(e.texts)[:limit], np.int64) for e in examples]
        labels = np.array([e.label for e in examples], np.float32 if task.kind == "regression" else np.int64)
        return rows, labels

    train, train_labels = encode(train_file)
    dev, dev_labels = encode(dev_file)
    lengths = np.array([len(r) for r in train])
    plan = plan_batches(lengths, a.batch_size, PLAN_EPOCHS, a.seed)  # the device's order, epoch after epoch
    dev_plan = plan_batches(np.array([len(r) for r in dev]), a.batch_size, 1, seed=0)  # as JointModel.predict

    def flat(parts):
        return np.concatenate(parts), np.cumsum([0] + [len(p) for p in parts])

    arrays = {}
    for name, parts in (("train", train), ("dev", dev), ("plan", plan), ("dev_plan", dev_plan)):
        values, offsets = flat(parts)
        arrays[f"{name}_{'idx' if 'plan' in name else 'ids'}"] = values
        arrays[f"{name}_offsets"] = offsets
    np.savez(work / "data.npz", train_labels=train_labels, dev_labels=dev_labels, pad_id=manifest.pad_token_id,
             **arrays)
    return {"task": {"name": task.name, "kind": task.kind, "num_labels": task.num_labels, "out_dim": task.out_dim,
                     "metric": task.metric},
            "train_file": str(train_file), "dev_file": str(dev_file), "data": str(work / "data.npz"),
            "train_rows": len(train), "dev_rows": len(dev), "manifest": manifest, "header": task.has_header,
            "mean_train_tokens": float(lengths.mean()),
            "mean_padded_tokens": float(np.mean([lengths[b].max() for b in plan[: max(1, len(plan) // PLAN_EPOCHS)]]))}


# ----------------------------------------------------------------------------- processes

class Harness:
    def __init__(self, a, work: Path, engines: dict[str, Path], data: dict):
        self.a, self.work, self.engines, self.data = a, work, engines, data
        engine = engines["fp32"]
        self.budget = a.budget_minutes * 60
        self.config = data["manifest"].config
        manifest = data["manifest"]
        random_init = manifest.source == "random-init"
        self.common = {"engine": str(engine), "data": data["data"], "task": data["task"], "seed": a.seed,
                       "init_seed": manifest.seed if random_init else a.seed,
                       "pretrained": None if random_init else manifest.model_id,
                       "batch_size": a.batch_size, "max_len": a.max_len, "budget_s": self.budget,
                       "evals": a.evals, "eval_at_zero": not a.no_zero_eval, "threads": a.threads}

    def _spec(self, name: str, **fields) -> Path:
        spec = dict(self.common, out=str(self.work / f"{name}.result.json"), **fields)
        path = self.work / f"{name}.spec.json"
        path.write_text(json.dumps(spec))
        return path

    def reused(self, name: str, fields: dict) -> dict | None:
        """With --reuse: the earlier result of this worker when its spec is exactly the same."""
        spec, out = self.work / f"{name}.spec.json", self.work / f"{name}.result.json"
        if not (self.a.reuse and spec.is_file() and out.is_file()):
            return None
        same = json.loads(spec.read_text()) == dict(self.common, out=str(out), **fields)
        return json.loads(out.read_text()) if same else None

    def start(self, name: str, **fields) -> subprocess.Popen:
        spec = self._spec(name, **fields)
        logf = open(self.work / "logs" / f"{name}.log", "w")
        proc = subprocess.Popen(limited([sys.executable, WORKER, spec], self.a.mem_limit), stdout=logf,
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
            peak = vmhwm_of(proc.pid)
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

    def run(self, name: str, timeout: float, **fields) -> dict:
        return self.finish(name, self.start(name, **fields), timeout)

    @property
    def timeout(self) -> float:
        return self.budget * self.a.timeout_factor + 300


class TrainerProcess:
    """`trainer serve` in its own process on 127.0.0.1 (a server's memory is not the device's)."""

    def __init__(self, a, work: Path, name: str, cache: bool, checkpoint_every: int):
        self.name, self.port = name, free_port()
        self.runs = work / f"runs-{name}"
        shutil.rmtree(self.runs, ignore_errors=True)  # a --reuse rerun: the server's runs start afresh
        cmd = [sys.executable, "-m", "mobillm.trainer.cli", "serve", "--host", "127.0.0.1", "--port", self.port,
               "--runs", self.runs, "--threads", a.server_threads, "--checkpoint-every", checkpoint_every,
               "--lr", a.lr_side, "--device", a.server_device] + (["--cache"] if cache else [])
        logf = open(work / "logs" / f"server-{name}.log", "w")
        self.proc = subprocess.Popen(limited(cmd, a.mem_limit), stdout=logf, stderr=subprocess.STDOUT)
        logf.close()
        self.ready = False

    def wait_ready(self) -> None:
        if not self.ready:
            self._wait_listening(120)
            self.ready = True

    def _wait_listening(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"trainer serve exited with {self.proc.returncode}; see its log")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                pass
            try:  # waiting on the process is the poll interval, and notices an early exit
                self.proc.wait(0.2)
            except subprocess.TimeoutExpired:
                pass
        raise RuntimeError(f"trainer serve did not listen on port {self.port} within {timeout:.0f} s")

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/"

    def stop(self) -> None:
        stop_process(self.proc)


class CheckpointWatcher(threading.Thread):
    """Hard-links each checkpoint.pt the server writes (it replaces the file atomically, so every
    version is a new inode) into its own snapshot folder with the run's config.json."""

    def __init__(self, run_dir: Path, snap_dir: Path):
        super().__init__(daemon=True, name="checkpoint-watcher")
        self.run_dir, self.snap_dir = run_dir, snap_dir
        self.snapshots: list[dict] = []
        self._seen: set[int] = set()
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(0.05):
            self.poll()
        self.poll()

    def poll(self) -> None:
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
        self._done.set()
        self.join(10)


# ----------------------------------------------------------------------------- methods

def local_jobs(h: Harness, method: str) -> list[tuple[str, dict]]:
    """The worker processes of one on-device method: (name, spec fields)."""
    if method == "mobillm-local":
        return [(method, {"worker": "side-local", "lr": h.a.lr_side, "snap_dir": str(h.work / "snaps" / method)})]
    lr = {"full": h.a.lr_full, "lora": h.a.lr_lora, "lora64": h.a.lr_lora, "bitfit": h.a.lr_bitfit,
          "split": h.a.lr_full}[method]
    jobs = [(method, {"worker": "torch", "method": method, "config": h.config, "lr": lr, "cut": h.a.split_layer,
                      "link_bytes_per_s": h.a.link_mbps * 1e6 / 8})]
    if method == "split":
        # Device memory and compute from a process that holds only the device half.
        jobs.append(("split-device", {"worker": "split-device", "config": h.config, "lr": lr, "cut": h.a.split_layer,
                                      "steps": h.a.split_device_steps}))
    return jobs


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
                    if time.monotonic() - started < h.timeout:
                        continue
                done = name
            proc, started = running.pop(done)
            results[done] = h.finish(done, proc, max(1.0, h.timeout - (time.monotonic() - started)), started)
            log(f"{done}: {brief(results[done])}")
    finally:
        for proc, _ in running.values():
            stop_process(proc)
    return results


def merge_split(results: dict) -> None:
    """split's device numbers come from the split-device process."""
    device = results.pop("split-device", None)
    split = results.get("split")
    if split is None or device is None:
        return
    split["device_process"] = device
    if "error" in device:
        split.setdefault("error", f"split-device: {device['error']}")
    elif "error" not in split:
        split["peak_rss_mb"] = device["peak_rss_mb"]
        split["device_s_per_iter"] = device["device_s_per_iter"]
        split["device_cpu_s_per_iter"] = device.get("device_cpu_s_per_iter")


def run_edge(h: Harness, method: str, server: TrainerProcess, epochs: int) -> dict:
    mode, _, throttled, weights = SERVER_VARIANTS[method]
    proxy = None
    url = server.url
    if throttled:
        proxy = LinkProxy(server.port, rate=h.a.link_mbps * 1e6 / 8)
        url = f"ws://127.0.0.1:{proxy.start()}/"
    watcher = CheckpointWatcher(server.runs / method, h.work / "snaps" / method)
    watcher.start()
    try:
        result = h.run(method, h.timeout, worker="edge", server=url, mode=mode, epochs=epochs, run=method,
                       engine=str(h.engines[weights]),
                       train_file=h.data["train_file"], side_out=str(h.work / "side" / f"{method}.onnx"))
    finally:
        watcher.stop()
        if proxy is not None:
            proxy.stop()
    if proxy is not None:
        result["proxy_bytes_up"] = proxy.bytes_up
    result["snapshots"] = watcher.snapshots
    result["epochs"] = epochs
    if (server.runs / method / "config.json").is_file():
        init = h.work / "snaps" / method / "init"
        init.mkdir(parents=True, exist_ok=True)
        shutil.copy2(server.runs / method / "config.json", init / "config.json")
        result["init_folder"] = str(init)
    return result


def warm_up(h: Harness, server: TrainerProcess) -> None:
    """One tiny run on a fresh server, untimed: a server in service is warm (torch kernels, the
    lazy ONNX exporter import); without this the first variant on each server pays for it."""
    rows = Path(h.data["train_file"]).read_text(encoding="utf-8").splitlines()
    head = 1 if h.data["header"] else 0
    warm = h.work / "warmup.tsv"
    warm.write_text("\n".join(rows[: head + h.a.batch_size]) + "\n", encoding="utf-8")
    r = h.run(f"warmup-{server.name}", h.timeout, worker="edge", server=server.url, mode="pooled", epochs=1,
              run="warmup", train_file=str(warm), side_out=str(h.work / "side" / f"warmup-{server.name}.onnx"))
    if "error" in r:
        raise RuntimeError(f"warm-up run on trainer serve ({server.name}) failed: {r['error']}")


def evaluate_side_networks(h: Harness, results: dict) -> None:
    """Score every side-network snapshot of every side-network method in one evaluator process
    (the dev forward passes are shared: the backbone is frozen)."""
    items, where = [], []
    for method, r in results.items():
        if "error" in r and not r.get("snapshots"):
            continue
        if method == "mobillm-local":
            for k, point in enumerate(r["curve"]):
                items.append({"folder": point["snapshot"], "engine": str(h.engines["fp32"])})
                where.append((method, "curve", k))
        elif method in SERVER_VARIANTS and "t0" in r:  # (a device that failed has no clock to place points on)
            engine = str(h.engines[SERVER_VARIANTS[method][3]])
            if r.get("init_folder") and not h.a.no_zero_eval:
                items.append({"folder": r["init_folder"], "init": True, "engine": engine})
                where.append((method, "init", None))
            for k, snap in enumerate(r["snapshots"]):
                items.append({"folder": snap["folder"], "engine": engine})
                where.append((method, "snapshot", k))
            if r.get("side"):
                items.append({"onnx": r["side"], "engine": engine})
                where.append((method, "final", None))
    if not items:
        return
    log(f"evaluating {len(items)} side networks on the dev rows (JointModel)")
    out = h.run("evaluate", h.timeout, worker="evaluate", items=items, dev_file=h.data["dev_file"])
    if "error" in out:
        for method, *_ in where:
            results[method].setdefault("error", f"evaluate: {out['error']}")
        return
    for (method, kind, k), metric, step in zip(where, out["metrics"], out["steps"]):
        r = results[method]
        if kind == "curve":
            r["curve"][k]["metric"] = metric
        elif kind == "init":
            r.setdefault("server_curve", []).append({"t": 0.0, "metric": metric, "step": 0})
        elif kind == "snapshot":
            snap = r["snapshots"][k]
            r.setdefault("server_curve", []).append({"t": snap["mtime"] - r["t0"], "metric": metric, "step": step,
                                                      "source": "server checkpoint"})
        else:
            r.setdefault("server_curve", []).append({"t": r["t_model"] - r["t0"], "metric": metric,
                                                      "step": r["stats"]["server_metrics"].get("steps"),
                                                      "source": "returned model"})
    for method in SERVER_VARIANTS:
        r = results.get(method)
        if r and "server_curve" in r:
            r["curve"] = dedupe_by_step(r.pop("server_curve"))


def dedupe_by_step(points: list[dict]) -> list[dict]:
    """One point per training step (the server saves a checkpoint twice at the end), earliest time;
    the returned model replaces the final checkpoint, at the time the device had it."""
    final = [p for p in points if p.get("source") == "returned model"]
    final_step = final[0]["step"] if final else None
    kept: dict = {}
    for p in sorted(points, key=lambda p: p["t"]):
        if p.get("source") == "server checkpoint" and p["step"] == final_step:
            continue
        kept.setdefault(p["step"], p)
    return sorted(kept.values(), key=lambda p: p["t"])


# ----------------------------------------------------------------------------- report

def in_budget(curve: list[dict], budget: float) -> list[dict]:
    """Scored points inside the budget. A time-budgeted run stops at the end of the step that
    crossed the budget; that last point (`final`) counts as the budget's."""
    return sorted((p for p in curve if p.get("metric") is not None and (p["t"] <= budget or p.get("final"))),
                  key=lambda p: p["t"])


def metric_after_budget(curve: list[dict], budget: float) -> float | None:
    points = in_budget(curve, budget)
    return points[-1]["metric"] if points else None


def time_to_target(curve: list[dict], target: float, budget: float) -> float | None:
    """The first evaluation at or above the target."""
    return next((p["t"] for p in in_budget(curve, budget) if p["metric"] >= target), None)


def time_to_stay(curve: list[dict], target: float, budget: float) -> float | None:
    """The first evaluation from which every later one (within the budget) stays at or above the target."""
    points = in_budget(curve, budget)
    return next((p["t"] for k, p in enumerate(points) if all(q["metric"] >= target for q in points[k:])), None)


def wire_bytes_per_sample(taps, tokens: int, mode: str, fmt: str | None = None, rows: int = 16) -> float:
    """Bytes of one BATCH frame per row, every row carrying `tokens` tokens of every tap."""
    from mobillm.common import wire
    from mobillm.kernels import codec

    n = rows * tokens
    payloads = []
    for k, t in enumerate(taps):
        f = fmt or t.fmt
        if f == "fp16":
            codes, scales = np.zeros((n, t.hidden), np.float16), np.zeros((n, 0), np.float16)
        else:
            codes = np.zeros((n, codec.code_bytes(f, t.hidden)), np.uint8)
            scales = np.zeros((n, codec.n_blocks(t.hidden, t.block_size)), np.float16)
        payloads.append(wire.TapPayload(f, t.block_size, t.hidden, codes, scales, k))
    batch = wire.Batch(0, np.arange(rows, dtype=np.uint64), np.zeros(rows, np.int64),
                       np.full(rows, tokens, np.uint32), payloads, mode)
    return len(wire.batch_frame(batch)) / rows


def summarize(h: Harness, results: dict, methods: list[str]) -> dict:
    a, budget = h.a, h.budget
    finals = {m: metric_after_budget(results[m].get("curve", []), budget) for m in methods}
    best_method = max((m for m in methods if finals[m] is not None), key=lambda m: finals[m], default=None)
    best = finals[best_method] if best_method else None
    target = a.target_frac * best if best is not None else None
    start = {m: next((pt["metric"] for pt in results[m].get("curve", []) if pt["t"] == 0
                      and pt.get("metric") is not None), None) for m in methods}
    # Is there anything to time? The best method must beat the best untrained metric by more than
    # two binomial standard errors of an accuracy on this many dev rows (0.5 / sqrt(n) at most).
    noise = 2 * 0.5 / math.sqrt(max(1, h.data["dev_rows"])) if h.data["task"]["metric"] == "accuracy" else None
    start_best = max((v for v in start.values() if v is not None), default=None)
    signal = None if best is None or start_best is None or noise is None else best - start_best > noise
    # Methods whose untrained metric already meets the target: their time to target is 0 and says nothing.
    at_zero = [m for m in methods if start[m] is not None and target is not None and start[m] >= target]
    rows = []
    for m in methods:
        r = results[m]
        ttt = time_to_target(r.get("curve", []), target, budget) if target is not None else None
        if m in SERVER_VARIANTS and "t_model" in r:  # the server trained them; the run ends when the model is back
            trained, train_s = r["stats"]["server_metrics"].get("samples_trained"), r["t_model"] - r["t0"]
        else:
            trained, train_s = r.get("samples"), max((p["t"] for p in r.get("curve", [])), default=None)
        rows.append({"method": m, "description": METHODS[m], "peak_rss_mb": r.get("peak_rss_mb"),
                     "loadavg_1min": r.get("loadavg_1min"),
                     "device_s_per_iter": r.get("device_s_per_iter"),
                     "device_cpu_s_per_iter": r.get("device_cpu_s_per_iter"), "bytes_per_sample": r.get("bytes_per_sample"),
                     "bytes_sent": r.get("bytes_sent"), "steps": r.get("steps"), "samples": r.get("samples"),
                     "samples_trained": trained, "train_s": train_s,
                     "samples_per_s": trained / train_s if trained and train_s else None,
                     "metric_after_budget": finals[m], "time_to_target_s": ttt,
                     "time_to_stay_s": time_to_stay(r.get("curve", []), target, budget) if target is not None else None,
                     "error": r.get("error"), "curve": r.get("curve", [])})
    by = {row["method"]: row for row in rows}
    taps = h.data["manifest"].taps
    padded = wire_bytes_per_sample(taps, 256, "tokens")
    padded_fp16 = wire_bytes_per_sample(taps, 256, "tokens", "fp16")
    pooled_calc = wire_bytes_per_sample(taps, 1, "pooled", rows=a.batch_size)
    pooled_meas = (by.get("mobillm-pooled") or {}).get("bytes_per_sample")
    bytes_cmp = {"padded256_engine_fmt": padded, "padded256_fp16": padded_fp16, "pooled_computed": pooled_calc,
                 "pooled_measured": pooled_meas, "tap_format": ",".join(sorted({t.fmt for t in taps})),
                 "ratio": padded / (pooled_meas or pooled_calc), "ratio_fp16": padded_fp16 / (pooled_meas or pooled_calc)}
    goals = []

    def ratio_goal(name, num_m, den_m, key, limit):
        num, den = by.get(num_m, {}).get(key), by.get(den_m, {}).get(key)
        if num_m not in by or den_m not in by:
            return
        untrained = [m for m in (num_m, den_m) if m in at_zero]
        if key == "time_to_target_s" and (signal is False or untrained):
            why = ("no method learned beyond noise" if signal is False else
                   f"the target is not above the untrained metric of {' and '.join(untrained)}")
            value, text, ok = None, f"not measurable ({why})", None
        elif key == "time_to_target_s" and num is not None and den is None:
            value, text = num / budget, f"< {num / budget:.2f} ({den_m} missed the target in the budget)"
            ok = value <= limit
        elif num is None or den is None or not den:
            value, text, ok = None, f"n/a ({num_m} {'missed the target' if num is None else '?'})", False
        else:
            value = num / den
            text, ok = f"{value:.2f}", value <= limit
        goals.append({"goal": name, "limit": limit, "value": value, "text": text, "met": ok})

    ratio_goal("device memory mobillm-pooled / LoRA", "mobillm-pooled", "lora", "peak_rss_mb", 0.25)
    ratio_goal("device memory mobillm-pooled / Full-FT", "mobillm-pooled", "full", "peak_rss_mb", 0.2)
    ratio_goal("device memory mobillm-int8 / LoRA", "mobillm-int8", "lora", "peak_rss_mb", 0.25)
    ratio_goal("device memory mobillm-int8 / Full-FT", "mobillm-int8", "full", "peak_rss_mb", 0.2)
    ratio_goal("device memory mobillm-int4 / LoRA", "mobillm-int4", "lora", "peak_rss_mb", 0.25)
    ratio_goal("time to target mobillm-pooled / LoRA", "mobillm-pooled", "lora", "time_to_target_s", 0.43)
    ratio_goal("time to target mobillm-cache / LoRA", "mobillm-cache", "lora", "time_to_target_s", 0.2)
    goals.append({"goal": "bytes/sample padded-256 / pooled", "limit": 50, "value": bytes_cmp["ratio"],
                  "text": f"{bytes_cmp['ratio']:.0f}x", "met": bytes_cmp["ratio"] >= 50, "at_least": True})
    return {"model": a.model, "task": a.task, "batch_size": a.batch_size, "max_len": a.max_len,
            "budget_s": budget, "train_rows": h.data["train_rows"], "dev_rows": h.data["dev_rows"],
            "overrides": a.overrides, "seed": a.seed, "target_frac": a.target_frac, "best_method": best_method,
            "best_metric": best, "target": target, "metric": h.data["task"]["metric"], "rows": rows,
            "start_metrics": start, "start_best": start_best, "at_zero": at_zero, "noise": noise, "signal": signal,
            "bytes": bytes_cmp, "goals": goals, "split_layer": a.split_layer, "link_mbps": a.link_mbps,
            "num_layers": h.data["manifest"].num_layers, "random_init": h.data["manifest"].source == "random-init", "mobillm_epochs": a.mobillm_epochs,
            "mean_train_tokens": h.data["mean_train_tokens"], "mean_padded_tokens": h.data["mean_padded_tokens"]}


def fmt_num(v, spec: str, none: str = "—") -> str:
    return none if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def markdown(s: dict) -> str:
    lines = [f"Target: {s['target_frac']:.2f} x best {s['metric']} after the budget "
             f"({s['best_method']}: {fmt_num(s['best_metric'], '.3f')}) = **{fmt_num(s['target'], '.3f')}**; "
             f"budget {s['budget_s']:.0f} s per method.", "",
             "| method | device peak RSS (MiB) | device s/iter | device CPU s/iter | bytes/sample on the link | "
             f"samples trained / s | {s['metric']} after budget | time to target (s) | stays above from (s) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in s["rows"]:
        if r["error"]:
            lines.append(f"| {r['method']} | failed: {r['error'][:80]} | | | | | | | |")
            continue
        lines.append(f"| {r['method']} | {fmt_num(r['peak_rss_mb'], '.0f')} | {fmt_num(r['device_s_per_iter'], '.3f')} | "
                     f"{fmt_num(r['device_cpu_s_per_iter'], '.3f')} | "
                     f"{fmt_num(r['bytes_per_sample'], ',.0f')} | {fmt_num(r['samples_per_s'], '.1f')} | "
                     f"{fmt_num(r['metric_after_budget'], '.3f')} | "
                     f"{fmt_num(r['time_to_target_s'], '.1f', 'not reached')} | "
                     f"{fmt_num(r.get('time_to_stay_s'), '.1f', 'not reached')} |")
    if s["at_zero"]:
        lines += ["", f"Note: the target is not above the untrained (t = 0) metric of {', '.join(s['at_zero'])}: "
                      f"their time to target is 0 and says nothing."]
    if s["signal"] is False:
        lines += ["", f"**No signal:** the best {s['metric']} after the budget ({s['best_metric']:.3f}) is within "
                      f"two standard errors (±{s['noise']:.3f} on {s['dev_rows']} rows) of the best untrained one "
                      f"({s['start_best']:.3f}); this run's {s['metric']} and time-to-target columns are noise."]
    b = s["bytes"]
    lines += ["", f"Bytes per sample, the paper's scheme (every tap, padded to 256 tokens, {b['tap_format']}): "
                  f"{b['padded256_engine_fmt']:,.0f} ({b['padded256_fp16']:,.0f} in fp16); pooled: "
                  f"{fmt_num(b['pooled_measured'], ',.0f')} measured, {b['pooled_computed']:,.0f} computed -> "
                  f"**{b['ratio']:.0f}x** less ({b['ratio_fp16']:.0f}x against fp16).", "",
              "| goal | limit | measured | met |", "|---|---|---|---|"]
    for g in s["goals"]:
        limit = f">= {g['limit']}x" if g.get("at_least") else f"<= {g['limit']}"
        met = "—" if g["met"] is None else "yes" if g["met"] else "**no**"
        lines.append(f"| {g['goal']} | {limit} | {g['text']} | {met} |")
    return "\n".join(lines)


def plot(s: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 5))
    styles = {"full": "C0", "lora": "C1", "lora64": "olive", "bitfit": "C2", "split": "C3", "mobillm-local": "C4",
              "mobillm-pooled": "C5", "mobillm-tokens": "C6", "mobillm-cache": "C7", "mobillm-60mbps": "C8",
              "mobillm-int8": "C9", "mobillm-int4": "black"}
    for r in s["rows"]:
        pts = [p for p in r["curve"] if p.get("metric") is not None]
        if not pts:
            continue
        ls = "-" if r["method"].startswith("mobillm") else "--"
        ax.plot([p["t"] for p in pts], [p["metric"] for p in pts], ls, marker="o", ms=3.5,
                color=styles.get(r["method"]), label=r["method"])
    if s["target"] is not None:
        ax.axhline(s["target"], color="grey", lw=0.8, ls=":", label=f"target {s['target']:.3f}")
    ax.axvline(s["budget_s"], color="black", lw=0.6, ls=":")
    ax.set_xlabel("wall-clock training time (s), evaluation excluded")
    ax.set_ylabel(f"dev {s['metric']} ({s['dev_rows']} rows)")
    weights = "random init" if s["random_init"] else "real weights"
    ax.set_title(f"{s['model']} ({weights}) on {s['task']}: dev metric vs wall-clock, budget {s['budget_s']:.0f} s",
                 fontsize=10)
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- main

def mobillm_epochs(h: Harness, results: dict) -> int:
    """Epochs for the mobillm runs: enough samples to fill `--fill` of the budget at the device's
    measured forward rate (the server's training overlaps with it)."""
    if h.a.mobillm_epochs:
        return h.a.mobillm_epochs
    per_row = (results.get("mobillm-local") or {}).get("forward_s_per_row")
    if not per_row:
        cal = h.run("calibrate", h.timeout, worker="calibrate", steps=4)
        per_row = cal.get("forward_s_per_row")
    if not per_row:
        return 1
    h.a.forward_s_per_row = per_row  # start_servers spaces the checkpoints by it
    return int(max(1, min(h.a.max_epochs, round(h.a.fill * h.budget / per_row / h.data["train_rows"]))))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="opt-350m", help="short name (random init from export/configs) or an HF id "
                                                       "/ checkpoint folder (real weights)")
    p.add_argument("--task", default="sst2", help="task preset (data from ../shared/data/glue)")
    p.add_argument("--batch-size", type=int, default=16, help="rows per batch, every method")
    p.add_argument("--max-len", type=int, default=128, help="truncate rows to this many tokens")
    p.add_argument("--budget-minutes", type=float, default=2.0, help="training wall-clock per method")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="model config override, as export-backbone --set (e.g. hidden_size=64)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {', '.join(METHODS)}")
    p.add_argument("--train-rows", type=int, default=512, help="training rows (a seeded random subset)")
    p.add_argument("--dev-rows", type=int, default=200, help="dev rows (a seeded random subset)")
    p.add_argument("--data-dir", type=Path, default=None, help="folder with train.tsv and dev.tsv")
    p.add_argument("--tokenizer", type=Path, default=None, help="tokenizer folder for the export "
                                                                "(default ../shared/data/tokenizer/opt)")
    p.add_argument("--quant", default="nf4", help="tap format of the engine")
    p.add_argument("--seed", type=int, default=0, help="random-init, data subset and data order seed")
    p.add_argument("--evals", type=int, default=4, help="evaluations per run (plus one at t = 0)")
    p.add_argument("--no-zero-eval", action="store_true", help="skip the evaluation at t = 0")
    p.add_argument("--target-frac", type=float, default=0.95, help="target = this x the best metric after the budget")
    p.add_argument("--split-layer", type=int, default=None, help="split learning cut (default: a quarter of the layers)")
    p.add_argument("--split-device-steps", type=int, default=16, help="steps of the split device-memory process")
    p.add_argument("--link-mbps", type=float, default=60.0, help="uplink of the throttled mobillm run and of split "
                                                                 "learning's transfers")
    p.add_argument("--lr-full", type=float, default=5e-5, help="peak lr, Full-FT and split")
    p.add_argument("--lr-lora", type=float, default=5e-4, help="peak lr, LoRA")
    p.add_argument("--lr-bitfit", type=float, default=1e-3, help="peak lr, BitFit")
    p.add_argument("--lr-side", type=float, default=1e-3, help="peak lr, side network (mobillm, MobiLLM-L)")
    p.add_argument("--mobillm-epochs", type=int, default=None, help="epochs of the mobillm runs (default: sized to "
                                                                     "the budget from the measured forward rate)")
    p.add_argument("--fill", type=float, default=0.7, help="share of the budget the mobillm runs are sized to")
    p.add_argument("--max-epochs", type=int, default=50, help="cap on the sized mobillm epochs")
    p.add_argument("--threads", type=int, default=None, help="torch/ORT threads in the method processes")
    p.add_argument("--jobs", type=int, default=1, help="on-device methods run this many at a time; above 1 the "
                                                       "timings are not comparable (smoke tests only)")
    p.add_argument("--server-threads", type=int, default=1, help="torch threads of trainer serve")
    p.add_argument("--server-device", default="cpu", help="torch device of trainer serve: cpu, cuda, cuda:N")
    p.add_argument("--timeout-factor", type=float, default=3.0, help="a method is stopped after this x budget + 300 s")
    p.add_argument("--mem-limit", type=int, default=16_000_000_000, help="address-space cap per process (bytes)")
    p.add_argument("--engines", type=Path, default=ROOT / "engines", help="engine cache folder")
    p.add_argument("--engine", type=Path, default=None, help="use this exported engine (random-init or not); its "
                                                             "manifest's config sets the dims of every method")
    p.add_argument("--engine-int8", type=Path, default=None, help="with --engine: the same model exported with "
                                                                  "--weights int8 (for mobillm-int8)")
    p.add_argument("--engine-int4", type=Path, default=None, help="with --engine: the same model exported with "
                                                                  "--weights int4 (for mobillm-int4)")
    p.add_argument("--work", type=Path, default=None, help="keep run files here (default: a temp folder)")
    p.add_argument("--reuse", action="store_true", help="with --work: reuse on-device methods already run there "
                                                        "with the same settings (an interrupted comparison)")
    p.add_argument("--summarize-only", action="store_true",
                   help="with --work (and the run's other options): rebuild the table, JSON and plot from the "
                        "results.json of a finished run there; nothing is run again")
    p.add_argument("--json-out", type=Path, default=None, help="write the summary JSON here")
    p.add_argument("--markdown-out", type=Path, default=None, help="write the table here")
    p.add_argument("--plot", type=Path, default=ROOT / "docs" / "img" / "compare.png", help="plot path")
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks: stop every child
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"compare: unknown methods {unknown}; choose from {', '.join(METHODS)}")
    if shutil.which("prlimit") is None:
        raise SystemExit("compare: needs prlimit (util-linux) to cap each process's memory")
    t_start = time.perf_counter()
    tmp = None
    if a.work is None:
        tmp = tempfile.TemporaryDirectory(prefix="compare-")
        a.work = Path(tmp.name)
    work = a.work.resolve()
    for sub in ("logs", "snaps", "side"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    servers: dict[str, TrainerProcess] = {}
    try:
        remote = [m for m in methods if m in SERVER_VARIANTS]
        if remote and a.jobs > 1 and a.mobillm_epochs:
            start_servers(a, work, remote, servers, a.train_rows)  # start-up overlaps the export and local methods
        engines = {"fp32": ensure_engine(a, work)}
        for weights in sorted({SERVER_VARIANTS[m][3] for m in remote} - {"fp32"}):
            engines[weights] = ensure_engine(a, work, weights)
        data = prepare_data(a, engines["fp32"], work)
        if a.engine is not None:
            a.model = (data["manifest"].gguf or {}).get("short_name") or Path(data["manifest"].model_id).name
        num_layers = data["manifest"].num_layers
        a.split_layer = a.split_layer or max(1, num_layers // 4)
        if not 1 <= a.split_layer < num_layers:
            raise SystemExit(f"compare: --split-layer must be in 1..{num_layers - 1}")
        h = Harness(a, work, engines, data)
        log(f"{a.model}: {num_layers} layers, {data['train_rows']} train / {data['dev_rows']} dev rows, "
            f"budget {h.budget:.0f} s per method, work folder {work}")
        if a.summarize_only:
            if not (work / "results.json").is_file():
                raise SystemExit(f"compare: --summarize-only: no {work / 'results.json'} (run the comparison first)")
            return report(h, json.loads((work / "results.json").read_text()), methods, None, argv)
        jobs = [job for m in methods if m not in SERVER_VARIANTS for job in local_jobs(h, m)]
        results = run_jobs(h, jobs, a.jobs)
        merge_split(results)
        if remote:
            if not a.mobillm_epochs:
                a.mobillm_epochs = mobillm_epochs(h, results)
                if "mobillm-cache" in remote and a.mobillm_epochs < 2:
                    log("mobillm runs: 2 epochs, not 1, so that the --cache server has epochs to train from its "
                        "cache; runs that pass the budget are cut at it")
                    a.mobillm_epochs = 2
            start_servers(a, work, remote, servers, data["train_rows"])
            for m in remote:
                key = "cache" if SERVER_VARIANTS[m][1] else "plain"
                if not servers[key].ready:
                    servers[key].wait_ready()
                    warm_up(h, servers[key])
                log(f"{m}: {METHODS[m]}")
                results[m] = run_edge(h, m, servers[key], a.mobillm_epochs)
                log(f"{m}: {brief(results[m])}")
        for server in servers.values():
            server.stop()
        evaluate_side_networks(h, results)
        (work / "results.json").write_text(json.dumps(results, indent=1, default=str))  # raw, for a closer look
        return report(h, results, methods, time.perf_counter() - t_start, argv)
    finally:
        for server in servers.values():
            server.stop()
        if tmp is not None:
            tmp.cleanup()


def report(h: Harness, results: dict, methods: list[str], harness_s: float | None, argv) -> int:
    """Summary, table, JSON and plot of a finished run; exit status 1 when a method failed."""
    a = h.a
    summary = summarize(h, results, methods)
    summary["harness_s"] = harness_s
    summary["command"] = "python bench/compare.py " + " ".join(sys.argv[1:] if argv is None else argv)
    table = markdown(summary)
    print(table)
    if harness_s is not None:
        print(f"\nwhole run: {harness_s / 60:.1f} min", file=sys.stderr)
    if a.json_out:
        a.json_out.parent.mkdir(parents=True, exist_ok=True)
        a.json_out.write_text(json.dumps(summary, indent=2, default=str))
    if a.markdown_out:
        a.markdown_out.write_text(table + "\n")
    if a.plot:
        plot(summary, a.plot)
    return 0 if not any(r["error"] for r in summary["rows"]) else 1


def start_servers(a, work: Path, remote: list[str], servers: dict, train_rows: int) -> None:
    """One `trainer serve` per server flavour (plain, --cache); checkpoints ~`--evals` times within the
    budget (a slow device, long rows: the run's steps can outlast the budget, and a checkpoint only
    after it would leave the budget's curve with nothing but t = 0)."""
    steps = a.mobillm_epochs * math.ceil(train_rows / a.batch_size)
    per_row = getattr(a, "forward_s_per_row", None)
    if per_row:
        steps = min(steps, max(1, int(a.budget_minutes * 60 / (per_row * a.batch_size))))
    every = max(1, math.ceil(steps / max(1, a.evals)))
    for m in remote:
        cache = SERVER_VARIANTS[m][1]
        key = "cache" if cache else "plain"
        if key not in servers:
            log(f"trainer serve ({key}): {a.mobillm_epochs} epochs x {train_rows} rows per run, "
                f"checkpoint every {every} steps")
            servers[key] = TrainerProcess(a, work, key, cache, every)


def brief(r: dict) -> str:
    if "error" in r:
        return f"FAILED: {r['error']}"
    return (f"peak RSS {fmt_num(r.get('peak_rss_mb'), '.0f')} MiB, {fmt_num(r.get('device_s_per_iter'), '.3f')} s/iter, "
            f"{r.get('steps')} steps")


if __name__ == "__main__":
    sys.exit(main())
