"""The processes bench/paper/compare.py starts, one per method (plus one evaluator).

    python -m mobillm.bench.paper.compare_workers SPEC.json      # writes SPEC["out"] (JSON) and exits

Every worker runs in a fresh process and reports its own peak RSS (VmHWM): the memory of one
method alone. Token ids, batch order and dev batches come from one file the harness wrote
(`data.npz`): every method sees the same data in the same order. Torch baselines never import
onnxruntime or the edge runtime; the edge device never imports torch.

Clocks. Each worker times its own training and stops the clock while it evaluates or writes a
snapshot. Next to wall seconds per step it reports CPU seconds per step (all threads), which
other work on a shared machine barely moves. The lr of the time-budgeted methods warms up over 3
steps and decays linearly to 0 at the budget. A method whose planned batches (PLAN_EPOCHS epochs)
all run inside the budget stops there: its last step is scored, counts as the budget's point
(`final`), and the result says `plan_exhausted` (tiny models on an idle machine).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from mobillm.bench.paper.baselines import adapt, train_only_bitfit
from mobillm.common.procfs import peak_rss_mb

WARMUP_STEPS = 3


# ----------------------------------------------------------------------------- data

class Data:
    """Token ids, labels and batch plans written by the harness (data.npz)."""

    def __init__(self, path: str):
        z = np.load(path)
        self.train = _split_rows(z["train_ids"], z["train_offsets"])
        self.train_labels = z["train_labels"]
        self.dev = _split_rows(z["dev_ids"], z["dev_offsets"])
        self.dev_labels = z["dev_labels"]
        self.dev_split = z["dev_split"] if "dev_split" in z else np.zeros(len(self.dev_labels), np.int64)
        self.plan = _split_rows(z["plan_idx"], z["plan_offsets"])  # training batches, epoch after epoch
        self.dev_plan = _split_rows(z["dev_plan_idx"], z["dev_plan_offsets"])
        self.pad_id = int(z["pad_id"])
        has_holdout = "holdout_ids" in z and len(z["holdout_offsets"]) > 1
        self.holdout = _split_rows(z["holdout_ids"], z["holdout_offsets"]) if has_holdout else []
        self.holdout_labels = z["holdout_labels"] if has_holdout else np.zeros(0)
        self.holdout_plan = _split_rows(z["holdout_plan_idx"], z["holdout_plan_offsets"]) if has_holdout else []


def _split_rows(flat: np.ndarray, offsets: np.ndarray) -> list[np.ndarray]:
    return [flat[a:b] for a, b in zip(offsets[:-1], offsets[1:])]


def padded(rows: list[np.ndarray], pad_id: int):
    """Right-padded torch ids and attention mask for one batch (padded to its longest row)."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.from_numpy(r.astype(np.int64))
        mask[i, : len(r)] = 1
    return ids, mask


def lr_factor(step: int, elapsed: float, budget: float) -> float:
    """Warm-up over WARMUP_STEPS steps, linear decay to 0 at the wall-clock budget."""
    return min(1.0, (step + 1) / WARMUP_STEPS) * max(0.0, 1.0 - elapsed / budget)


class Schedule:
    """When to evaluate: at t = 0 and at `evals` evenly spaced points of the budget."""

    def __init__(self, budget: float, evals: int):
        self.points = [budget * (i + 1) / evals for i in range(evals)]

    def due(self, elapsed: float) -> bool:
        if self.points and elapsed >= self.points[0]:
            while self.points and elapsed >= self.points[0]:
                self.points.pop(0)
            return True
        return False


def score(task_spec: dict, outputs: np.ndarray, labels: np.ndarray) -> float:
    """The task's metric (mobillm.common.tasks, the same code the trainer and `edge-run eval` use)."""
    from mobillm.common.tasks import get_task
    from mobillm.common.tasks import score as task_score

    task = get_task(task_spec["name"])
    return float(task_score(task, outputs, labels)[task.metric])


def predictions(task_spec: dict, outputs: np.ndarray) -> list:
    """Per-example predictions (class index, or the regression value), for paired comparisons."""
    if task_spec.get("kind", "class") == "regression":
        return [round(float(v), 5) for v in outputs.reshape(-1)]
    return outputs.argmax(axis=-1).astype(int).tolist()


def dev_point(task_spec: dict, outputs: np.ndarray, labels: np.ndarray, split: np.ndarray) -> dict:
    """`metric` on the first dev split, and `by_split` where a task has several (MNLI), each on its own rows."""
    names = task_spec.get("dev_splits") or ["dev"]
    by_split = {name: score(task_spec, outputs[split == k], labels[split == k]) for k, name in enumerate(names)}
    return {"metric": by_split[names[0]], **({"by_split": by_split} if len(names) > 1 else {})}


# ----------------------------------------------------------------------------- torch baselines

def engine_config(spec: dict):
    """The transformers config the engine's manifest recorded (any family with a row)."""
    from transformers import CONFIG_MAPPING

    return CONFIG_MAPPING[spec["config"]["model_type"]].from_dict(dict(spec["config"]))


def build_classifier(spec: dict):
    """AutoModelForSequenceClassification from the engine's config: random weights drawn exactly as
    the exporter drew the engine's (same seed, same order: the backbones are identical), or the
    engine's real checkpoint (a GGUF engine's cached conversion: the very weights it was exported from)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    config = engine_config(spec)
    config.num_labels = spec["task"]["out_dim"]
    torch.manual_seed(spec["init_seed"])
    if spec.get("pretrained"):
        return AutoModelForSequenceClassification.from_pretrained(spec["pretrained"], config=config,
                                                                  attn_implementation="eager")
    if config.model_type == "opt":
        from transformers import OPTForSequenceClassification

        return OPTForSequenceClassification(config)  # the exporter's draw order for random-init OPT
    return AutoModelForSequenceClassification.from_config(config, attn_implementation="eager")


def decoder_parts(base) -> tuple[list, list]:
    """(embedding modules, decoder layers) of a base model: OPT keeps them under .decoder."""
    dec = getattr(base, "decoder", base)
    embeds = [dec.embed_tokens] + [getattr(dec, n) for n in ("embed_positions", "project_in")
                                   if getattr(dec, n, None) is not None]
    return embeds, list(dec.layers)


def device_params(model, cut: int) -> list:
    """Parameters the device holds in split learning: embeddings (+ positions, project_in) and layers 1..cut."""
    embeds, layers = decoder_parts(model.base_model)
    return [p for m in embeds + layers[:cut] for p in m.parameters()]


def torch_worker(spec: dict) -> dict:
    """Every torch baseline: train what `baselines.adapt` leaves trainable, for the budget.

    split, split-bitfit: the same model cut after layer `cut`; the activation is detached at the cut
    (what the device sends up), the server half runs forward and backward to the cut, and the cut's
    gradient (what the server sends down) is back-propagated through the device half. Both halves
    run here; the clock adds the link time of those two tensors at `link_bytes_per_s`. split-bitfit
    trains only biases (norm scales on Gemma) on both halves, plus the server's head.
    """
    import torch

    method, data = spec["method"], Data(spec["data"])
    budget, labels = spec["budget_s"], torch.from_numpy(data.train_labels)
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    model, params = adapt(build_classifier(spec), method)
    groups = [params]
    cut_state: dict = {}
    split = method in ("split", "split-bitfit")
    if split:
        cut = spec["cut"]
        mine = {id(p) for p in device_params(model, cut)}
        groups = [[p for p in params if id(p) in mine], [p for p in params if id(p) not in mine]]

        def at_cut(module, inputs, output):
            cut_state["device_out"] = output
            cut_state["t_cut"] = time.perf_counter()
            sent = output.detach().requires_grad_(True)
            cut_state["sent"] = sent
            return sent

        decoder_parts(model.base_model)[1][cut - 1].register_forward_hook(at_cut)
    groups = [g for g in groups if g]  # (a half with nothing to train has no optimizer)
    opts = [torch.optim.AdamW(g, lr=spec["lr"], weight_decay=0.01) for g in groups]
    trainable = sum(p.numel() for g in groups for p in g)

    def outputs(rows: list, plan: list) -> np.ndarray:
        out = np.zeros((len(rows), spec["task"]["out_dim"]), np.float32)
        with torch.no_grad():
            for idx in plan:
                ids, mask = padded([rows[i] for i in idx], data.pad_id)
                out[idx] = model(input_ids=ids, attention_mask=mask).logits.float().numpy()
        return out

    def evaluate() -> dict:
        """The dev metric (+ per-example predictions) and, with held-out train rows, their metric."""
        model.eval()
        out = outputs(data.dev, data.dev_plan)
        point = {**dev_point(spec["task"], out, data.dev_labels, data.dev_split),
                 "dev_pred": predictions(spec["task"], out)}
        if data.holdout:
            point["holdout"] = score(spec["task"], outputs(data.holdout, data.holdout_plan), data.holdout_labels)
        model.train()
        return point

    curve = [{"t": 0.0, **evaluate(), "step": 0, "samples": 0}] if spec["eval_at_zero"] else []
    schedule = Schedule(budget, spec["evals"])
    elapsed, step, samples, link_bytes, link_s = 0.0, 0, 0, 0, 0.0
    step_s, cpu_s, device_s, server_s = [], [], [], []
    model.train()
    for idx in data.plan:
        if elapsed >= budget:
            break
        ids, mask = padded([data.train[i] for i in idx], data.pad_id)
        t0, c0 = time.perf_counter(), time.process_time()
        factor = lr_factor(step, elapsed, budget)
        for opt in opts:
            for g in opt.param_groups:
                g["lr"] = spec["lr"] * factor
        out = model(input_ids=ids, attention_mask=mask, labels=labels[idx])
        out.loss.backward()
        if split:
            t_server = time.perf_counter()
            sent = cut_state["sent"]
            cut_state["device_out"].backward(sent.grad)  # the gradient the server sent down
            t_device_bwd = time.perf_counter() - t_server
            nbytes = 2 * sent.numel() * sent.element_size()  # activation up + gradient down, fp32, padded
            link_bytes += nbytes
            link_s += nbytes / spec["link_bytes_per_s"]
        for g, opt in zip(groups, opts):
            torch.nn.utils.clip_grad_norm_(g, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        t1 = time.perf_counter()
        cpu_s.append(time.process_time() - c0)
        dt = t1 - t0
        if split:
            device_s.append(cut_state["t_cut"] - t0 + t_device_bwd)
            server_s.append(dt - device_s[-1])
            dt += nbytes / spec["link_bytes_per_s"]  # split learning waits for both transfers
        step_s.append(t1 - t0)
        elapsed += dt
        step += 1
        samples += len(idx)
        if schedule.due(elapsed) or elapsed >= budget:
            curve.append({"t": elapsed, **evaluate(), "step": step, "samples": samples,
                          "final": elapsed >= budget})
    exhausted = elapsed < budget  # every planned batch ran inside the budget: the run ends here
    if exhausted and step and (not curve or curve[-1]["step"] != step):
        curve.append({"t": elapsed, **evaluate(), "step": step, "samples": samples, "final": True})
    result = {"curve": curve, "steps": step, "samples": samples, "trainable_params": trainable,
              "plan_exhausted": exhausted,
              "device_s_per_iter": float(np.mean(step_s)) if step_s else float("nan"),
              "device_cpu_s_per_iter": float(np.mean(cpu_s)) if cpu_s else float("nan"),
              "bytes_per_sample": 0.0, "bytes_sent": 0}
    if split:
        result.update({"bytes_per_sample": link_bytes / max(samples, 1), "bytes_sent": link_bytes // 2,
                       "bytes_received": link_bytes // 2, "link_s": link_s,
                       "inprocess_device_s_per_iter": float(np.mean(device_s)) if device_s else float("nan"),
                       "inprocess_server_s_per_iter": float(np.mean(server_s)) if server_s else float("nan")})
    return result


def split_device_worker(spec: dict) -> dict:
    """The device half of split learning alone: embeddings + layers 1..cut, forward and backward.

    It receives a gradient for the cut activation (random here: memory and compute do not depend
    on its values) and steps AdamW on its own parameters (split-bitfit: its biases, or norm scales
    on Gemma), over the batches the split run trained on.
    """
    import torch
    from transformers import AutoModel

    data = Data(spec["data"])
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    config = engine_config(spec)
    config.num_hidden_layers = spec["cut"]  # only the lower layers are ever built (or loaded)
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[: spec["cut"]]
    torch.manual_seed(spec["init_seed"])
    if spec.get("pretrained"):
        base = AutoModel.from_pretrained(spec["pretrained"], config=config, attn_implementation="eager")
    else:
        base = AutoModel.from_config(config, attn_implementation="eager")
    decoder = getattr(base, "decoder", base)
    for top in ("project_out", "final_layer_norm", "norm"):  # they belong to the top of the model
        if getattr(decoder, top, None) is not None:
            setattr(decoder, top, torch.nn.Identity())
    decoder.train()
    if spec.get("method") == "split-bitfit":
        train_only_bitfit(decoder)
    params = [p for p in decoder.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec["lr"], weight_decay=0.01)
    times, cpu, nbytes, samples = [], [], 0, 0
    for idx in data.plan[: spec["steps"]]:
        ids, mask = padded([data.train[i] for i in idx], data.pad_id)
        grad = torch.randn(len(idx), ids.shape[1], config.hidden_size) * 1e-3  # "received" from the server
        t0, c0 = time.perf_counter(), time.process_time()
        h = decoder(input_ids=ids, attention_mask=mask).last_hidden_state
        h.backward(grad)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        nbytes += 2 * h.numel() * 4
        samples += len(idx)
    return {"device_s_per_iter": float(np.mean(times[1:] or times)), "steps": len(times),
            "device_cpu_s_per_iter": float(np.mean(cpu[1:] or cpu)),
            "bytes_per_sample": nbytes / max(samples, 1),
            "device_params": sum(p.numel() for p in decoder.parameters()),
            "device_trainable_params": sum(p.numel() for p in params)}


# ----------------------------------------------------------------------------- side networks

def write_snapshot(folder: Path, run_config, state_dict, step: int) -> Path:
    """A run-like folder (config.json + checkpoint.pt) that `trainer export` can turn into ONNX."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    run_config.save(folder)
    torch.save({"model": state_dict, "progress": {"step": step}}, folder / "checkpoint.pt")
    return folder


def side_local_worker(spec: dict) -> dict:
    """MobiLLM-L: the side network trained on the device itself.

    The device runs the exported engine in ONNX Runtime (taps quantized in the graph, exactly as
    for mobillm), decodes each row's last token with the reference codec and trains the same
    SideNetwork, optimizer and loss as `trainer serve` in torch, in this one process.
    """
    import dataclasses

    import torch

    from mobillm.edge_runtime.backbone import Backbone
    from mobillm.common.manifest import manifest_digest
    from mobillm.kernels import codec
    from mobillm.trainer.config import OptimConfig, RunConfig, SideConfig
    from mobillm.trainer.model import build_side_network, task_loss
    from mobillm.trainer.core import make_optimizer

    data, budget, task = Data(spec["data"]), spec["budget_s"], spec["task"]
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    bb = Backbone(spec["engine"], threads=spec.get("threads"))
    taps = bb.manifest.taps
    optim = OptimConfig(lr=spec["lr"], seed=spec["seed"])  # (the server's --seed: init and order)
    # The pooled readout mobillm's device sends: the last token and the tokens' masked mean (summary
    # rows, read through mean pooling as the server does) where the engine has them, else the last token.
    summary = bool(bb.manifest.summary_row)
    keep, per_sample = ("summary", 2) if summary else ("pooled", 1)
    side = SideConfig().for_taps([t.hidden for t in taps], task["out_dim"])
    side = dataclasses.replace(side, pooling="mean") if summary else side
    run_config = RunConfig(
        run="mobillm-local", task=task["name"], task_type=task["kind"], num_labels=task["num_labels"],
        model_id=bb.manifest.model_id, manifest_sha256=manifest_digest(bb.folder), device_id="local",
        mode=keep, epochs=1, samples_per_epoch=len(data.train),
        taps=[{"layer": t.layer, "hidden": t.hidden, "fmt": t.fmt, "block_size": t.block_size} for t in taps],
        cache=False, side=side, optim=optim)
    model = build_side_network(side, optim.seed)
    opt = make_optimizer(model, optim)
    snaps = Path(spec["snap_dir"])
    curve = []
    if spec["eval_at_zero"]:
        curve.append({"t": 0.0, "step": 0, "samples": 0,
                      "snapshot": str(write_snapshot(snaps / "s0000", run_config, model.state_dict(), 0))})
    schedule = Schedule(budget, spec["evals"])
    elapsed, step, samples, fwd_s, step_s, cpu_s = 0.0, 0, 0, [], [], []
    model.train()
    for idx in data.plan:
        if elapsed >= budget:
            break
        t0, c0 = time.perf_counter(), time.process_time()
        outs, _ = bb.forward([data.train[i] for i in idx], keep=keep)  # per_sample rows per sample, in order
        inputs = [torch.from_numpy(codec.decode_arrays(t.codes, t.scales, t.spec.fmt, t.spec.hidden,
                                                       t.spec.block_size)) for t in outs]
        t_fwd = time.perf_counter()
        for g in opt.param_groups:
            g["lr"] = optim.lr * lr_factor(step, elapsed, budget)
        logits = model.logits_from_rows(inputs, torch.full((len(idx),), per_sample, dtype=torch.long))
        loss = task_loss(logits, torch.from_numpy(data.train_labels[idx]), task["kind"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)
        opt.step()
        t1 = time.perf_counter()
        cpu_s.append(time.process_time() - c0)
        fwd_s.append(t_fwd - t0)
        step_s.append(t1 - t0)
        elapsed += t1 - t0
        step += 1
        samples += len(idx)
        if schedule.due(elapsed) or elapsed >= budget:
            folder = write_snapshot(snaps / f"s{step:04d}", run_config, model.state_dict(), step)
            curve.append({"t": elapsed, "step": step, "samples": samples, "snapshot": str(folder),
                          "final": elapsed >= budget})
    exhausted = elapsed < budget  # every planned batch ran inside the budget: the run ends here
    if exhausted and step and (not curve or curve[-1]["step"] != step):
        folder = write_snapshot(snaps / f"s{step:04d}", run_config, model.state_dict(), step)
        curve.append({"t": elapsed, "step": step, "samples": samples, "snapshot": str(folder), "final": True})
    return {"curve": curve, "steps": step, "samples": samples, "bytes_per_sample": 0.0, "bytes_sent": 0,
            "plan_exhausted": exhausted,
            "device_s_per_iter": float(np.mean(step_s)) if step_s else float("nan"),
            "device_cpu_s_per_iter": float(np.mean(cpu_s)) if cpu_s else float("nan"),
            "forward_s_per_row": float(np.sum(fwd_s) / max(samples, 1))}


def calibrate_worker(spec: dict) -> dict:
    """Seconds per row of the device's forward pass (ORT) on the first batches of the run."""
    from mobillm.edge_runtime.backbone import Backbone

    data = Data(spec["data"])
    bb = Backbone(spec["engine"], threads=spec.get("threads"))
    times, rows = [], 0
    for idx in data.plan[: spec["steps"]]:
        t0 = time.perf_counter()
        bb.forward([data.train[i] for i in idx])
        times.append(time.perf_counter() - t0)
        rows += len(idx)
    return {"forward_s_per_row": sum(times) / rows, "steps": len(times)}


def edge_worker(spec: dict) -> dict:
    """The mobillm device: `edge-run train`'s streaming client against a `trainer serve` process."""
    from mobillm.common.tasks import get_task
    from mobillm.edge_runtime.backbone import Backbone
    from mobillm.edge_runtime.data import load_examples
    from mobillm.edge_runtime.stream import StreamClient, TrainOptions, stats_dict

    task = get_task(spec["task"]["name"])
    bb = Backbone(spec["engine"], threads=spec.get("threads"))
    examples = load_examples(spec["train_file"], task)
    # "pooled" rows read the engine's pooled readout: `edge-run train`'s default, the last token and the
    # masked mean (--send summary) where the engine has a summary row, else the last token
    mode = "summary" if spec["mode"] == "pooled" and bb.manifest.summary_row else spec["mode"]
    opts = TrainOptions(server=spec["server"], epochs=spec["epochs"], batch_size=spec["batch_size"],
                        max_len=spec["max_len"], mode=mode, seed=spec["seed"], run=spec["run"],
                        progress=False)
    trainer = StreamClient(bb, examples, task, opts)
    t0, c0 = time.time(), time.process_time()
    stats = trainer.run()
    t_model, cpu = time.time(), time.process_time() - c0  # every thread: forward, quantize, frames, sends
    side = trainer.save_model(Path(spec["side_out"]))
    return {"t0": t0, "t_model": t_model, "stats": stats_dict(stats), "side": str(side), "send": mode,
            "steps": stats.batches_sent, "samples": stats.samples_sent,
            "bytes_per_sample": stats.bytes_sent / max(stats.samples_sent, 1), "bytes_sent": stats.bytes_sent,
            "device_s_per_iter": stats.forward_s / max(stats.batches_sent, 1),
            "device_cpu_s_per_iter": cpu / max(stats.batches_sent, 1)}


class MemoBackbone:
    """A Backbone whose forward passes are remembered: the backbone is frozen, so the dev taps
    of one batch are the same for every side network evaluated on it."""

    def __init__(self, backbone):
        self._bb, self._memo = backbone, {}

    def __getattr__(self, name):
        return getattr(self._bb, name)

    def forward(self, rows, keep: str = "all"):
        key = (keep, b"|".join(np.asarray(r, np.int64).tobytes() for r in rows))
        if key not in self._memo:
            self._memo[key] = self._bb.forward(rows, keep=keep)
        return self._memo[key]


def evaluate_worker(spec: dict) -> dict:
    """Dev metric of side networks with JointModel (ORT backbone + ORT side network, the device's path).

    Snapshot folders (a server run's checkpoints, MobiLLM-L's snapshots) are turned into ONNX by
    `trainer export`'s function first; a folder with `init: true` holds a run's config only and is
    evaluated with the side network the server starts from (same seed).
    """
    import torch

    from mobillm.common.tasks import get_task
    from mobillm.edge_runtime.backbone import Backbone
    from mobillm.edge_runtime.data import load_examples
    from mobillm.edge_runtime.predict import JointModel
    from mobillm.trainer.config import RunConfig
    from mobillm.trainer.export import reexport
    from mobillm.trainer.model import build_side_network

    task = get_task(spec["task"]["name"])
    backbones: dict[str, MemoBackbone] = {}
    dev_files = spec.get("dev_files") or {"dev": spec["dev_file"]}
    devs = {split: load_examples(path, task) for split, path in dev_files.items()}
    holdout = load_examples(spec["holdout_file"], task) if spec.get("holdout_file") else []
    holdout_gold = np.array([e.label for e in holdout])
    metrics, steps, by_split, holdout_metrics, dev_preds = [], [], [], [], []
    for item in spec["items"]:
        engine = item.get("engine", spec["engine"])
        if engine not in backbones:
            backbones[engine] = MemoBackbone(Backbone(engine, threads=spec.get("threads")))
        bb = backbones[engine]
        step = None
        if item.get("onnx"):
            path = Path(item["onnx"])
        else:
            folder = Path(item["folder"])
            if item.get("init"):
                cfg = RunConfig.load(folder)
                torch.save({"model": build_side_network(cfg.side, cfg.optim.seed).state_dict(),
                            "progress": {"step": 0}}, folder / "checkpoint.pt")
            step = int(torch.load(folder / "checkpoint.pt", weights_only=True)["progress"]["step"])
            path, _ = reexport(folder)
            # the rows it reads (summary: last token + mean, mean pooling), as the device records beside a
            # returned model: without it JointModel would feed a summary-trained network the last token only
            cfg = RunConfig.load(folder)
            path.with_suffix(".json").write_text(json.dumps({"config": {"pooling": cfg.side.pooling},
                                                             "mode": cfg.mode}))
        joint = JointModel(bb, path)
        scores, preds = {}, []
        for split, dev in devs.items():  # each dev split on its own (MNLI: matched, mismatched)
            out = joint.predict(dev, spec["max_len"], spec["batch_size"], False)
            scores[split] = score(spec["task"], out, np.array([e.label for e in dev]))
            preds += predictions(spec["task"], out)
        metrics.append(next(iter(scores.values())))
        by_split.append(scores if len(scores) > 1 else None)
        steps.append(step)
        dev_preds.append(preds)
        holdout_metrics.append(score(spec["task"], joint.predict(holdout, spec["max_len"], spec["batch_size"], False),
                                     holdout_gold) if holdout else None)
    return {"metrics": metrics, "steps": steps, "by_split": by_split, "holdout": holdout_metrics,
            "dev_preds": dev_preds}


WORKERS = {"torch": torch_worker, "split-device": split_device_worker, "side-local": side_local_worker,
           "calibrate": calibrate_worker, "edge": edge_worker, "evaluate": evaluate_worker}


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    t0 = time.perf_counter()
    result = WORKERS[spec["worker"]](spec)
    result["peak_rss_mb"] = peak_rss_mb()
    result["process_s"] = time.perf_counter() - t0
    out = Path(spec["out"])
    out.with_suffix(".part").write_text(json.dumps(result))
    out.with_suffix(".part").replace(out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
