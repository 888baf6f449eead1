"""What the tap quantizer costs the device's forward pass: fused (com.mobillm) vs standard ops.

Opens every engine given with each tap quantizer it can run (edge_runtime/session.py:
`fused` where the engine has a fused graph and this machine's op library loads, and
`standard`) in one process, then times one forward per variant per round, variants
interleaved, and reports the best of the rounds (random ids, all tokens real):

    python bench/quantizer_cost.py ENGINE [ENGINE ...] --rounds 5 --batch 16 --tokens 128 --threads 2

Put an engine with fp16 taps next to the nf4 ones to see what quantizing costs at all.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from mobillm.edge_runtime.backbone import Backbone


def variants(engines: list[str], threads: int) -> dict[str, Backbone]:
    out = {}
    for engine in engines:
        for quantizer in ("fused", "standard"):
            bb = Backbone(engine, threads=threads, quantizer="auto" if quantizer == "fused" else quantizer)
            if bb.engine_session.quantizer == quantizer:
                m = bb.manifest
                out[f"{os.path.basename(engine.rstrip('/'))} {m.taps[0].fmt} taps, {m.weights} weights, "
                    f"{quantizer}"] = bb
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("engines", nargs="+", help="engine folders made by export-backbone")
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds (best of), after one warm-up")
    ap.add_argument("--batch", type=int, default=16, help="rows per forward")
    ap.add_argument("--tokens", type=int, default=128, help="tokens per row")
    ap.add_argument("--threads", type=int, default=2, help="ORT intra-op threads")
    a = ap.parse_args()
    runs = variants(a.engines, a.threads)
    ids = np.random.default_rng(0).integers(4, 1000, (a.batch, a.tokens))
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    best = {name: float("inf") for name in runs}
    for r in range(a.rounds + 1):
        for name, bb in runs.items():
            t = time.perf_counter()
            bb.session.run(None, feed)
            if r:  # round 0 warms up
                best[name] = min(best[name], time.perf_counter() - t)
    print(f"best of {a.rounds} interleaved rounds, batch {a.batch} x {a.tokens} tokens, {a.threads} threads, "
          f"load average {os.getloadavg()[0]:.2f}")
    for name, seconds in best.items():
        print(f"  {name:<55} {seconds * 1000:8.1f} ms")


if __name__ == "__main__":
    main()
