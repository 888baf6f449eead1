"""How bench/paper/compare.py runs each kind of method: on-device methods as worker processes, the
mobillm methods as a device worker against a `trainer serve` process, and the evaluation of
every side network they produced.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

from mobillm.bench.paper.compare_config import METHODS, SPLIT_METHODS, Settings
from mobillm.bench.paper.compare_curves import dedupe_by_step
from mobillm.bench.paper.compare_harness import CheckpointWatcher, Harness, TrainerProcess, log
from mobillm.common.netsim import LinkProxy


def local_jobs(h: Harness, method: str) -> list[tuple[str, dict]]:
    """The worker processes of one on-device method: (name, spec fields)."""
    lr = getattr(h.s, METHODS[method].lr)
    if method == "mobillm-local":
        return [(method, {"worker": "side-local", "lr": lr, "snap_dir": str(h.work / "snaps" / method)})]
    jobs = [(method, {"worker": "torch", "method": method, "config": h.config, "lr": lr, "cut": h.s.split_layer,
                      "link_bytes_per_s": h.s.link_mbps * 1e6 / 8})]
    if method in SPLIT_METHODS:
        # Device memory and compute from a process that holds only the device half.
        jobs.append((f"{method}-device", {"worker": "split-device", "method": method, "config": h.config, "lr": lr,
                                          "cut": h.s.split_layer, "steps": h.s.split_device_steps}))
    return jobs


def merge_split(results: dict) -> None:
    """split's and split-bitfit's device numbers come from their -device processes."""
    for method in SPLIT_METHODS:
        device = results.pop(f"{method}-device", None)
        split = results.get(method)
        if split is None or device is None:
            continue
        split["device_process"] = device
        if "error" in device:
            split.setdefault("error", f"{method}-device: {device['error']}")
        elif "error" not in split:
            split["peak_rss_mb"] = device["peak_rss_mb"]
            split["device_s_per_iter"] = device["device_s_per_iter"]
            split["device_cpu_s_per_iter"] = device.get("device_cpu_s_per_iter")


def run_edge(h: Harness, method: str, server: TrainerProcess, epochs: int) -> dict:
    """One mobillm method: the device worker streaming to `server` (through a throttled link if the
    method says so), the server's checkpoints kept as they are written."""
    spec = METHODS[method].server
    proxy = None
    url = server.url
    if spec.throttled:
        proxy = LinkProxy(server.port, rate=h.s.link_mbps * 1e6 / 8)
        url = f"ws://127.0.0.1:{proxy.start()}/"
    watcher = CheckpointWatcher(server.runs / method, h.work / "snaps" / method)
    watcher.start()
    try:
        result = h.run(method, worker="edge", server=url, mode=spec.mode, epochs=epochs, run=method,
                       engine=str(h.engines[spec.weights]),
                       train_file=h.data["train_file"], side_out=str(h.work / "side" / f"{method}.onnx"))
    finally:
        watcher.stop()
        if proxy is not None:
            proxy.stop()
    if proxy is not None:
        result["proxy_bytes_up"] = proxy.bytes_up
    result["snapshots"] = watcher.snapshots
    result["epochs"] = epochs
    summary = server.runs / method / "summary.json"
    selection = json.loads(summary.read_text()).get("selection") if summary.is_file() else None
    if selection:  # --select-epochs: the run trained 1 streamed + the chosen cached epochs
        result["selection"] = selection
        result["epochs"] = 1 + selection["epochs"]
    if (server.runs / method / "config.json").is_file():
        init = h.work / "snaps" / method / "init"
        init.mkdir(parents=True, exist_ok=True)
        shutil.copy2(server.runs / method / "config.json", init / "config.json")
        result["init_folder"] = str(init)
    return result


CALIBRATION_BATCHES, CALIBRATION_EPOCHS = 8, 4  # the --cache server's warm-up: 1 streamed + 3 cached epochs


def warm_up(h: Harness, server: TrainerProcess, cache: bool = False) -> float | None:
    """One small run on a fresh server, untimed: a server in service is warm (torch kernels, the
    lazy ONNX exporter import); without this the first variant on each server pays for it.

    On a --cache server the warm-up is also the calibration of its cached epochs: 8 batches, 1 epoch
    streamed and 3 trained from the cache; returns the seconds per cached step, measured from the
    step times in the server's metrics.jsonl (steps after the first epoch)."""
    rows = Path(h.data["train_file"]).read_text(encoding="utf-8").splitlines()
    head = 1 if h.data["header"] else 0
    batches, epochs = (CALIBRATION_BATCHES, CALIBRATION_EPOCHS) if cache else (1, 1)
    warm = h.work / "warmup.tsv"
    warm_rows = rows[head: head + batches * h.s.batch_size]
    warm.write_text("\n".join(rows[:head] + warm_rows) + "\n", encoding="utf-8")
    r = h.run(f"warmup-{server.name}", worker="edge", server=server.url, mode="pooled", epochs=epochs,
              run="warmup", train_file=str(warm), side_out=str(h.work / "side" / f"warmup-{server.name}.onnx"))
    if "error" in r:
        raise RuntimeError(f"warm-up run on trainer serve ({server.name}) failed: {r['error']}")
    return cached_step_s(server.runs / "warmup" / "metrics.jsonl", len(warm_rows)) if cache else None


def cached_step_s(metrics: Path, rows_per_epoch: int) -> float | None:
    """Seconds per step of the epochs a --cache server trains from its cache: the spacing of the
    metrics.jsonl records whose samples are past the first (streamed) epoch."""
    import json

    if not metrics.is_file():
        return None
    recs = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    cached = [r for r in recs if r["samples"] - r["rows"] >= rows_per_epoch]  # steps that started after epoch 1
    if len(cached) < 2:
        return None
    return (cached[-1]["time"] - cached[0]["time"]) / (len(cached) - 1)


def evaluate_side_networks(h: "Harness", results: dict) -> None:
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
        elif METHODS[method].server and "t0" in r:  # (a device that failed has no clock to place points on)
            engine = str(h.engines[METHODS[method].server.weights])
            if r.get("init_folder") and not h.s.no_zero_eval:
                items.append({"folder": r["init_folder"], "init": True, "engine": engine})
                where.append((method, "init", None))
            for k in on_grid(r["snapshots"], r["t0"], h.s.budget_s, h.s.evals):
                snap = r["snapshots"][k]
                items.append({"folder": snap["folder"], "engine": engine})
                where.append((method, "snapshot", k))
            if r.get("side"):
                items.append({"onnx": r["side"], "engine": engine})
                where.append((method, "final", None))
    if not items:
        return
    log(f"evaluating {len(items)} side networks on the dev rows (JointModel)")
    out = h.run("evaluate", worker="evaluate", items=items, dev_file=h.data["dev_file"],
                dev_files=h.data.get("dev_files"), holdout_file=h.data.get("holdout_file"))
    if "error" in out:
        for method, *_ in where:
            results[method].setdefault("error", f"evaluate: {out['error']}")
        return
    none = [None] * len(where)
    for (method, kind, k), metric, step, by_split, held, preds in zip(
            where, out["metrics"], out["steps"], out.get("by_split") or none, out.get("holdout") or none,
            out.get("dev_preds") or none):
        r = results[method]
        scores = {"metric": metric, **({"by_split": by_split} if by_split else {}),
                  **({"holdout": held} if held is not None else {}), **({"dev_pred": preds} if preds else {})}
        if kind == "curve":
            r["curve"][k].update(scores)
        elif kind == "init":
            r.setdefault("server_curve", []).append({"t": 0.0, **scores, "step": 0})
        elif kind == "snapshot":
            snap = r["snapshots"][k]
            r.setdefault("server_curve", []).append({"t": snap["mtime"] - r["t0"], **scores, "step": step,
                                                      "source": "server checkpoint"})
        else:
            r.setdefault("server_curve", []).append({"t": r["t_model"] - r["t0"], **scores,
                                                      "step": r["stats"]["server_metrics"].get("steps"),
                                                      "source": "returned model"})
    for method in (m for m, spec in METHODS.items() if spec.server):
        r = results.get(method)
        if r and "server_curve" in r:
            r["curve"] = dedupe_by_step(r.pop("server_curve"))


def on_grid(snapshots: list[dict], t0: float, budget: float, evals: int) -> list[int]:
    """Which server checkpoints to score: all of them when there are few; else the latest one at or
    before each of `evals` evenly spaced points of the budget (a --cache run checkpoints --evals times
    per epoch, and its cached epochs are short: scoring all would cost more than training)."""
    if len(snapshots) <= 2 * max(1, evals):
        return list(range(len(snapshots)))
    picked = []
    for i in range(1, evals + 1):
        before = [k for k, snap in enumerate(snapshots) if snap["mtime"] - t0 <= budget * i / evals]
        if before and before[-1] not in picked:
            picked.append(before[-1])
    return picked


def size_cache_epochs(s: Settings, train_rows: int, cached_s: float | None) -> tuple[int, str]:
    """Declared epochs of the --cache runs (and so the server's linear decay) that fill --cache-fill of
    the budget: the first epoch at the device's forward rate (the server trains as batches arrive),
    every later one at the server's measured cached step rate:
        epochs = 1 + floor((cache_fill x budget - rows x forward_s_per_row) / (steps per epoch x cached s/step)),
    at least 2, at most --max-epochs. Returns (epochs, the rule with its numbers, for the report)."""
    if s.cache_epochs:
        return s.cache_epochs, f"{s.cache_epochs} epochs (--cache-epochs)"
    if s.cache_select:
        lrs = f" x lr {','.join(f'{lr:g}' for lr in s.cache_select_lrs)}" if s.cache_select_lrs else ""
        ensemble = f", then trains {s.cache_ensemble} side networks with it (logits averaged)" \
            if s.cache_ensemble > 1 else ""
        replay = f"; during the stream it replays up to {s.cache_replay} cached batches per gap" \
            if s.cache_replay else ""
        return 2, (f"declared 2 (the streamed epoch's schedule); the server chooses the cached epochs among "
                   f"{','.join(map(str, s.cache_select))}{lrs} on 10 % of the cached samples held out{ensemble}"
                   f"{replay}")
    first = train_rows * s.forward_s_per_row if s.forward_s_per_row else None
    epoch_s = math.ceil(train_rows / s.batch_size) * cached_s if cached_s else None
    if first is None or not epoch_s:
        return max(2, s.mobillm_epochs or 2), "not sized (no forward or cached step rate measured)"
    epochs = 1 + math.floor((s.cache_fill * s.budget_s - first) / epoch_s)
    epochs = int(max(2, min(s.max_epochs, epochs)))
    return epochs, (f"1 + ({s.cache_fill:g} x {s.budget_s:.0f} s - first epoch {first:.1f} s) / cached epoch "
                    f"{epoch_s:.2f} s -> {epochs} epochs (at least 2, at most {s.max_epochs})")


def size_mobillm_runs(h: Harness, results: dict) -> Settings:
    """The settings with the mobillm runs' epochs: enough samples to fill `--fill` of the budget at the
    device's measured forward rate (the server's training overlaps with it), which is kept too
    (start_servers spaces the checkpoints by it)."""
    s = h.s
    if s.mobillm_epochs:
        return s
    per_row = (results.get("mobillm-local") or {}).get("forward_s_per_row")
    if not per_row:
        per_row = h.run("calibrate", worker="calibrate", steps=4).get("forward_s_per_row")
    epochs = int(max(1, min(s.max_epochs, round(s.fill * s.budget_s / per_row / h.data["train_rows"])))) if per_row else 1
    if "mobillm-cache" in s.methods and epochs < 2:
        log("mobillm runs: 2 epochs, not 1, so that the --cache server has epochs to train from its "
            "cache; runs that pass the budget are cut at it")
        epochs = 2
    return replace(s, mobillm_epochs=epochs, forward_s_per_row=per_row or None)


def start_servers(s: Settings, work: Path, remote: list[str], servers: dict, train_rows: int) -> None:
    """One `trainer serve` per server flavour (plain, --cache); checkpoints ~`--evals` times within the
    budget (a slow device, long rows: the run's steps can outlast the budget, and a checkpoint only
    after it would leave the budget's curve with nothing but t = 0)."""
    steps = s.mobillm_epochs * math.ceil(train_rows / s.batch_size)
    if s.forward_s_per_row:
        steps = min(steps, max(1, int(s.budget_s / (s.forward_s_per_row * s.batch_size))))
    every = max(1, math.ceil(steps / max(1, s.evals)))
    # --cache: the epochs are sized after the server's warm-up (its cached step rate); --evals checkpoints
    # per epoch, and the evaluation keeps the latest one before each of --evals points of the budget
    every_cached = max(1, math.ceil(math.ceil(train_rows / s.batch_size) / max(1, s.evals)))
    for m in remote:
        key = METHODS[m].server.key
        if key not in servers:
            cache = METHODS[m].server.cache
            sized = "chosen by the server (--cache-select)" if s.cache_select and not s.cache_epochs else \
                "sized after its warm-up"
            log(f"trainer serve ({key}): {sized if cache else s.mobillm_epochs} epochs x "
                f"{train_rows} rows per run, checkpoint every {every_cached if cache else every} steps")
            servers[key] = TrainerProcess(s, work, key, cache, every_cached if cache else every)
