"""What `edge-run serve` adds over the bare forward pass, on one engine and side network.

    python -m mobillm.bench.micro.serve_latency --engine ENGINE --side SIDE.onnx [--bundle BUNDLE] --threads 2
    python -m mobillm.bench.micro.serve_latency --make-tiny /tmp/tiny     # a tiny random OPT engine + side network first

The service runs as its own process (`edge-run serve --port 0`); this process is the client and
also runs the bare forward (tokenize + backbone + side network, `JointModel.logits`) with the same
engine and thread count. One-sentence latencies alternate bare / served call by call, so a busy
machine slows both alike. Then: throughput at batch 16 (one forward of 16 rows; one request of 16
texts; 16 clients of one text each), and 100 concurrent requests, five rounds, counting answers and
reading the server's RSS after each round. Prints one JSON object (docs/benchmarks.md, "Serving").
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from mobillm.bench.paths import TOKENIZER
from mobillm.common.procfs import rss_mb

SENTENCE = "the most boring two hours of my life, and the popcorn was stale too"


def random_side(engine: Path, side: Path, seed: int = 0) -> Path:
    """An untrained side network for `engine` (needs torch): its cost is a trained one's."""
    import torch

    from mobillm.common.manifest import Manifest, manifest_digest
    from mobillm.trainer.config import SideConfig
    from mobillm.trainer.export import export_onnx
    from mobillm.trainer.model import build_side_network

    m = Manifest.load(engine, verify=False)
    cfg = SideConfig().for_taps([t.hidden for t in m.taps], 2)
    torch.manual_seed(seed)
    side.write_bytes(export_onnx(build_side_network(cfg, seed=seed).eval()))
    side.with_suffix(".json").write_text(json.dumps({"config": cfg.to_meta(), "task": "sst2", "num_labels": 2,
                                                     "engine_sha256": manifest_digest(engine),
                                                     "model_id": m.model_id, "engine": str(engine)}))
    return side


def make_tiny(folder: Path) -> tuple[Path, Path]:
    """A tiny random OPT engine (nf4 taps) and a random side network for it (needs torch)."""
    from mobillm.common.sample import TINY_OPT
    from mobillm.export.pipeline import export_engine

    engine = folder / "engine"
    if not engine.is_dir():
        from mobillm.export.fallback_tokenizer import build_fallback_tokenizer

        tokenizer = TOKENIZER if (TOKENIZER / "vocab.json").is_file() else build_fallback_tokenizer(folder / "tokenizer")
        export_engine("opt-125m", engine, random_init=True, overrides=TINY_OPT, quant="nf4", progress=False,
                      tokenizer=tokenizer)
    return engine, random_side(engine, folder / "side_sst2.onnx")


def start_server(args, log: Path) -> tuple[subprocess.Popen, int]:
    """`edge-run serve` in its own process, its stderr (one line per request) in `log`."""
    source = ["--bundle", str(args.bundle)] if args.bundle else ["--engine", str(args.engine), "--side", str(args.side)]
    cmd = [sys.executable, "-m", "mobillm.edge_runtime.cli", "serve", *source, "--port", "0",
           "--threads", str(args.threads), "--max-batch", "16"]
    proc = subprocess.Popen(cmd, stderr=open(log, "w"), text=True)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        match = re.search(r":(\d+) \(POST", log.read_text())
        if match:
            return proc, int(match.group(1))
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"serve did not start: {log.read_text()[-2000:]}")


class Client:
    """One keep-alive HTTP connection."""

    def __init__(self, port: int):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)

    def post(self, payload: dict) -> dict:
        self.conn.request("POST", "/predict", body=json.dumps(payload), headers={"Content-Type": "application/json"})
        resp = self.conn.getresponse()
        body = json.loads(resp.read())
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {body}")
        return body


def pct(values: list[float]) -> dict:
    a = np.array(values) * 1000
    return {"p50_ms": round(float(np.percentile(a, 50)), 2), "p99_ms": round(float(np.percentile(a, 99)), 2),
            "n": len(values)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", type=Path)
    ap.add_argument("--side", type=Path, help="side network (default with --engine: an untrained one, made here)")
    ap.add_argument("--bundle", type=Path, default=None, help="serve this bundle instead of --engine/--side")
    ap.add_argument("--make-tiny", type=Path, default=None, metavar="DIR", help="make a tiny engine + side here")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--server-log", type=Path, default=None, help="keep the server's stderr here")
    ap.add_argument("--repeats", type=int, default=200, help="one-sentence calls of each kind")
    args = ap.parse_args()
    if args.make_tiny:
        args.engine, args.side = make_tiny(args.make_tiny)
    if args.engine and not args.side and not args.bundle:
        args.side = random_side(args.engine, Path(tempfile.mkdtemp()) / "side_sst2.onnx")
    if not (args.engine and (args.side or args.bundle)):
        ap.error("give --engine (and --side), --bundle, or --make-tiny DIR")

    from mobillm.edge_runtime.backbone import Backbone
    from mobillm.edge_runtime.predict import JointModel

    joint = JointModel(Backbone(args.engine, threads=args.threads), args.side)
    log = args.server_log or Path(tempfile.mkdtemp()) / "serve.log"
    proc, port = start_server(args, log)
    try:
        client = Client(port)
        for _ in range(10):  # warm-up both
            joint.logits([joint.bb.tokenize((SENTENCE,), 128)[0]])
            client.post({"text": SENTENCE})
        bare, served = [], []
        for _ in range(args.repeats):
            t = time.perf_counter()
            want = joint.logits([joint.bb.tokenize((SENTENCE,), 128)[0]])
            bare.append(time.perf_counter() - t)
            t = time.perf_counter()
            got = client.post({"text": SENTENCE})
            served.append(time.perf_counter() - t)
        diff = float(np.abs(np.array(got["logits"]) - want[0]).max())

        texts = [f"{SENTENCE} ({i})" for i in range(16)]
        rows = [joint.bb.tokenize((s,), 128)[0] for s in texts]
        rounds = max(5, args.repeats // 20)
        t = time.perf_counter()
        for _ in range(rounds):
            joint.logits(rows)
        bare16 = 16 * rounds / (time.perf_counter() - t)
        t = time.perf_counter()
        for _ in range(rounds):
            client.post({"texts": texts})
        served16 = 16 * rounds / (time.perf_counter() - t)
        clients = [Client(port) for _ in range(16)]
        with ThreadPoolExecutor(16) as pool:
            t = time.perf_counter()
            for _ in range(rounds):
                list(pool.map(lambda c_s: c_s[0].post({"text": c_s[1]}), zip(clients, texts)))
            clients16 = 16 * rounds / (time.perf_counter() - t)

        burst = []
        with ThreadPoolExecutor(100) as pool:
            for _ in range(5):
                def one(i: int) -> bool:
                    return "label" in Client(port).post({"text": f"{SENTENCE} #{i}"})

                answered = sum(pool.map(one, range(100)))
                burst.append({"answered": answered, "server_rss_mib": round(rss_mb(proc.pid), 1)})
    except Exception:
        print(f"server exit status {proc.poll()}; its last log lines:\n{log.read_text()[-3000:]}", file=sys.stderr)
        raise
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    one = {"bare": pct(bare), "served": pct(served)}
    one["p50_ratio"] = round(one["served"]["p50_ms"] / one["bare"]["p50_ms"], 3)
    print(json.dumps({
        "engine": str(args.engine), "served_from": "bundle" if args.bundle else "engine+side",
        "threads": args.threads, "loadavg": os.getloadavg(), "max_abs_logit_diff": diff,
        "one_sentence": one,
        "batch16_rows_per_s": {"bare_forward": round(bare16, 1), "one_request_16_texts": round(served16, 1),
                               "16_clients_1_text": round(clients16, 1)},
        "concurrent_100x5": burst,
    }, indent=2))


if __name__ == "__main__":
    main()
