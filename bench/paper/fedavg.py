"""The FedAvg-LoRA baseline of bench/paper/federated.py: synchronous FedAvg of LoRA (r on q_proj/v_proj,
peft) + a linear head, the backbone fine-tuned by backprop on each device (torch). FedAvg needs
one model, so devices average within their backbone family; each round waits for the slowest
device; update transfers are charged at the device's link speed.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from pathlib import Path

import numpy as np

from mobillm.common.procfs import peak_rss_mb


def fedavg_device(spec: dict, conn) -> None:
    """One FedAvg device process: LoRA + head on its backbone, driven over `conn` (train, eval, stop)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from mobillm.common.tasks import get_task
    from mobillm.common.tokenize import EngineTokenizer
    from mobillm.edge_runtime.data import load_examples
    from mobillm.export.source import Source, build_model, config_from_dict
    from mobillm.common.manifest import Manifest

    torch.set_num_threads(1)
    engine = Path(spec["engine"])
    manifest = Manifest.load(engine, verify=False)
    # The very backbone the engine was exported from (same config and seed), in torch.
    base = build_model(Source(manifest.source, manifest.model_id), config_from_dict(manifest.config), manifest.seed)
    lora = get_peft_model(base, LoraConfig(r=spec["lora_r"], lora_alpha=2 * spec["lora_r"], lora_dropout=0.0,
                                           target_modules=["q_proj", "v_proj"]))
    head = torch.nn.Linear(manifest.head_hidden, 2)
    torch.manual_seed(spec["seed"])
    tok = EngineTokenizer(engine / manifest.tokenizer_dir, manifest.token_rules)
    task = get_task(spec["task"])

    def encode(path):
        exs = load_examples(path, task)
        return [np.asarray(tok.encode(e.texts)[:spec["max_len"]]) for e in exs], np.array([e.label for e in exs])

    train_ids, train_y = encode(spec["data"])
    dev_ids, dev_y = encode(spec["dev"])
    params = [p for p in lora.parameters() if p.requires_grad] + list(head.parameters())

    def trainable() -> dict:
        state = {k: v for k, v in lora.state_dict().items() if "lora_" in k}
        state.update({f"head.{k}": v for k, v in head.state_dict().items()})
        return {k: v.detach().numpy().copy() for k, v in state.items()}

    def load(state: dict) -> None:
        lora.load_state_dict({k: torch.from_numpy(v) for k, v in state.items() if not k.startswith("head.")},
                             strict=False)
        head.load_state_dict({k[5:]: torch.from_numpy(v) for k, v in state.items() if k.startswith("head.")})

    def logits(batch_ids):
        lengths = torch.tensor([len(r) for r in batch_ids])
        ids = torch.full((len(batch_ids), int(lengths.max())), manifest.pad_token_id)
        for i, r in enumerate(batch_ids):
            ids[i, :len(r)] = torch.from_numpy(r)
        mask = (torch.arange(ids.shape[1])[None] < lengths[:, None]).long()
        hidden = lora(input_ids=ids, attention_mask=mask).last_hidden_state
        if spec["pooling"] == "mean":
            return head((hidden * mask[..., None]).sum(1) / lengths[:, None])
        return head(hidden[torch.arange(len(batch_ids)), lengths - 1])

    conn.send(("ready", trainable(), sum(v.nbytes for v in trainable().values())))
    rnd = 0
    while True:
        msg = conn.recv()
        if msg[0] == "train":
            state = msg[1]
            nbytes = sum(v.nbytes for v in state.values())
            time.sleep(nbytes / spec["link"])  # download the global update over this device's link
            t0 = time.process_time()
            load(state)
            opt = torch.optim.AdamW(params, lr=spec["lr"])
            order = np.random.default_rng([spec["seed"], rnd]).permutation(len(train_ids))
            for i in range(0, len(order), spec["batch_size"]):
                idx = order[i:i + spec["batch_size"]]
                loss = torch.nn.functional.cross_entropy(logits([train_ids[j] for j in idx]),
                                                         torch.from_numpy(train_y[idx]))
                opt.zero_grad()
                loss.backward()
                opt.step()
            update = trainable()
            compute = time.process_time() - t0  # CPU seconds of the local round (both of its threads' work)
            time.sleep(nbytes / spec["link"])  # upload the local update
            rnd += 1
            conn.send(("trained", update, len(train_ids), compute, 2 * nbytes))
        elif msg[0] == "eval":
            load(msg[1])
            with torch.no_grad():
                pred = torch.cat([logits(dev_ids[i:i + 64]).argmax(-1) for i in range(0, len(dev_ids), 64)])
            conn.send(("acc", float((pred.numpy() == dev_y).mean())))
        else:
            conn.send(("rss", peak_rss_mb()))
            return


def run_fedavg(args, devices: list[dict], dev_tsv: Path, task: str) -> dict:
    """Synchronous FedAvg rounds over every device; the mean accuracy of the global models after each round."""
    ctx = mp.get_context("spawn")
    pipes, procs = [], []
    for d in devices:
        parent, child = ctx.Pipe()
        spec = dict(engine=str(d["engine"]), data=str(d["data"]), dev=str(dev_tsv), link=d["link"], seed=args.seed,
                    lora_r=args.lora_r, lr=args.lora_lr, batch_size=args.batch_size, max_len=args.max_len,
                    pooling=args.pooling, task=task)
        procs.append(ctx.Process(target=fedavg_device, args=(spec, child)))
        procs[-1].start()
        pipes.append(parent)
    ready = [p.recv() for p in pipes]
    glob = {}
    for d, (_, state, _) in zip(devices, ready):
        glob.setdefault(d["family"], state)  # each family starts from its first device's initialisation
    t0, eval_s = time.time(), 0.0
    curve, compute, comm = [], {d["id"]: 0.0 for d in devices}, {d["id"]: 0 for d in devices}
    for rnd in range(args.epochs):
        for d, p in zip(devices, pipes):
            p.send(("train", glob[d["family"]]))
        updates = {}
        for d, p in zip(devices, pipes):
            _, state, n, seconds, nbytes = p.recv()
            updates.setdefault(d["family"], []).append((state, n))
            compute[d["id"]] += seconds
            comm[d["id"]] += nbytes
        for family, ups in updates.items():
            total = sum(n for _, n in ups)
            glob[family] = {k: sum(s[k] * (n / total) for s, n in ups) for k in ups[0][0]}
        done_at = time.time() - t0 - eval_s
        e0 = time.time()
        accs = {}
        for d, p in zip(devices, pipes):  # score each family's global model once (in its first device)
            if d["family"] not in accs:
                p.send(("eval", glob[d["family"]]))
                accs[d["family"]] = p.recv()[1]
        eval_s += time.time() - e0
        curve.append((done_at, float(np.mean([accs[d["family"]] for d in devices]))))
    rss = {}
    for d, p in zip(devices, pipes):
        p.send(("stop",))
        rss[d["id"]] = p.recv()[1]
    for p in procs:
        p.join(30)
    acc = {d["id"]: accs[d["family"]] for d in devices}
    return {"curve": curve, "wall_s": curve[-1][0], "devices": {
        d["id"]: {"accuracy": acc[d["id"]], "compute_s": compute[d["id"]], "bytes": comm[d["id"]],
                  "peak_rss_mb": rss[d["id"]], "update_bytes": ready[i][2]} for i, d in enumerate(devices)}}
