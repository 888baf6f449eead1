"""Trainer server throughput for OPT-350m-sized taps, and how often its training loop waits.

A real TrainerServer (this process) is fed by a SimDevice in a child process (so the device's
Python does not share the server's GIL) that sends pre-quantized frames as fast as credits allow.
Taps: 5 x hidden 1024 + the final 512-wide tap (OPT-350m after project_out), nf4, block 64.
Numbers come from the run's metrics.jsonl, over the steps after warm-up:

  samples/s    rows trained per wall second
  MB/s         BATCH bytes received per wall second
  step ms      mean time of one optimizer step (decode + forward + backward + AdamW)
  wait         share of wall time the training loop spent blocked on an empty queue

    python -m mobillm.bench.micro.trainer                      # CPU, all cases
    python -m mobillm.bench.micro.trainer --device cuda --samples 4096

What watching the server costs the training loop (docs/observability.md): --observe-rounds N runs
each case as three variants, interleaved round by round, and keeps each variant's best round:
  off          no TensorBoard event files, nobody scraping
  tensorboard  event files in the run folder (the default of `trainer serve`)
  scraped      event files, and a scraper process GETting /metrics and /status.json every second

    python -m mobillm.bench.micro.trainer --cases pooled/last --samples 2048 --threads 1 --observe-rounds 4
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import struct
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

from mobillm.common import wire
from mobillm.kernels import codec

TAPS = [{"layer": layer, "hidden": 1024, "fmt": "nf4", "block_size": 64} for layer in (4, 8, 12, 16, 20)]
TAPS.append({"layer": 24, "hidden": 512, "fmt": "nf4", "block_size": 64})
CASES = [("pooled", "last"), ("tokens", "last"), ("tokens", "mean")]
OBSERVE_VARIANTS = ("off", "tensorboard", "scraped")


def make_bodies(mode: str, rows: int, mean_tokens: int, pool: int, seed: int = 0) -> list[bytes]:
    """`pool` distinct BATCH bodies of real-codec nf4 taps (random activations, ragged lengths)."""
    rng = np.random.default_rng(seed)
    bodies = []
    for _ in range(pool):
        if mode == "pooled":
            lengths = np.ones(rows, np.uint32)
        else:
            lengths = rng.integers(mean_tokens // 2, mean_tokens * 3 // 2 + 1, rows).astype(np.uint32)
        n = int(lengths.sum())
        taps = []
        for i, t in enumerate(TAPS):
            x = (rng.standard_normal((n, t["hidden"])) * 2).astype(np.float32)
            enc = codec.encode(x, t["fmt"], t["block_size"])
            taps.append(wire.TapPayload(t["fmt"], t["block_size"], t["hidden"], enc.codes, enc.scales, i))
        labels = rng.integers(0, 2, rows).astype(np.int64)
        bodies.append(wire.Batch(0, np.arange(rows, dtype=np.uint64), labels, lengths, taps, mode).to_body())
    return bodies


def device_process(url: str, mode: str, samples: int, rows: int, bodies: list[bytes], out) -> None:
    from mobillm.edge_runtime.simulate import SimDevice, SyntheticTask

    def frame(seq: int, ids: np.ndarray) -> bytes:
        body = bodies[seq % len(bodies)]
        return wire.encode_frame(wire.MsgType.BATCH, None, struct.pack("<Q", seq) + body[8:])

    data = SyntheticTask(TAPS, n_samples=samples)
    result = SimDevice(url, data, task="bench", mode=mode, epochs=1, batch_size=rows, device_id=f"bench-{mode}",
                       run=f"bench-{mode}", frame_source=frame).run(timeout=600)
    out.put({"error": result.error, "seconds": result.seconds, "bytes": result.bytes_sent})


def scraper_process(port: int, stop, counts) -> None:
    """What a Prometheus server and an open status page do: GET /metrics and /status.json every second."""
    urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10).read()
    while not stop.wait(1.0):
        t0 = time.perf_counter()
        for path in ("/metrics", "/status.json"):
            urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10).read()
        counts.put(time.perf_counter() - t0)


def bench_case(mode: str, pooling: str, args, variant: str = "tensorboard", bodies=None) -> dict:
    from mobillm.trainer.config import ServerConfig, SideConfig
    from mobillm.trainer.server import TrainerServer

    bodies = bodies or make_bodies(mode, args.rows, args.tokens, args.pool)
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as runs:
        config = ServerConfig(port=0, runs_dir=runs, device=args.device, threads=args.threads,
                              side=SideConfig(pooling=pooling), checkpoint_every=10**9, bitplan_every=100,
                              tensorboard=variant != "off")
        with TrainerServer(config) as server:
            stop, scrapes = ctx.Event(), ctx.Queue()
            scraper = ctx.Process(target=scraper_process, args=(server.port, stop, scrapes)) if variant == "scraped" \
                else None
            if scraper is not None:
                scraper.start()
            out = ctx.Queue()
            child = ctx.Process(target=device_process, args=(server.url, mode, args.samples, args.rows, bodies, out))
            child.start()
            device = out.get(timeout=900)
            child.join()
            if scraper is not None:
                stop.set()
                scraper.join(30)
            latencies = []
            while not scrapes.empty():
                latencies.append(scrapes.get())
            serve_ms = serve_cost_ms(server) if variant == "scraped" else None
        if device["error"]:
            raise RuntimeError(f"device got {device['error']}")
        steps = [json.loads(line) for line in (Path(runs) / f"bench-{mode}" / "metrics.jsonl").read_text().splitlines()]
    warm = min(args.warmup_steps, len(steps) // 4)
    steady = steps[warm:]
    wall = steady[-1]["time"] - steps[warm - 1]["time"] if warm else steady[-1]["time"] - steady[0]["time"]
    mb = (steady[-1]["bytes_received"] - (steps[warm - 1]["bytes_received"] if warm else 0)) / 1e6
    return {"mode": mode, "pooling": pooling, "rows": args.rows,
            "tokens_per_row": 1 if mode == "pooled" else args.tokens,
            "bytes_per_batch": len(bodies[0]), "steps": len(steady),
            "samples_per_s": sum(s["rows"] for s in steady) / wall, "mb_per_s": mb / wall,
            "step_ms": 1000 * float(np.mean([s["step_s"] for s in steady])),
            "wait_frac": sum(s["wait_s"] for s in steady) / wall,
            "device_samples_per_s": args.samples / device["seconds"], "variant": variant,
            "scrapes": len(latencies), "scrape_ms": 1000 * float(np.median(latencies)) if latencies else None,
            "serve_ms": serve_ms}


def serve_cost_ms(server, n: int = 50) -> float:
    """Server-side milliseconds (best of n) to answer one scrape: /metrics + /status.json, on the event loop
    thread, which holds the GIL meanwhile: at one scrape a second, the most it can take from training."""
    from websockets.datastructures import Headers
    from websockets.http11 import Request

    requests = [Request(path, Headers()) for path in ("/metrics", "/status.json")]
    best = float("inf")
    for _ in range(n):
        t0 = time.perf_counter()
        for request in requests:
            assert server.http.process_request(None, request).status_code == 200
        best = min(best, time.perf_counter() - t0)
    return 1000 * best


def observer_step_us(n: int = 2000) -> dict:
    """Microseconds one step record costs the training thread: TensorBoard (queued; and with the board's
    writer thread's work); the page's trace + the step-time histogram."""
    from mobillm.trainer.board import board_factory
    from mobillm.trainer.metrics import server_metrics
    from mobillm.trainer.status import RunTrace

    class Run:  # what the observers read of a run
        name, folder, step = "bench", None, 0

    record = {"step": 1, "time": 0.0, "samples": 16, "rows": 16, "tokens": 16, "loss": 0.5, "lr": 1e-3,
              "grad_norm": 1.0, "wait_s": 0.0, "step_s": 0.05, "idle_frac": 0.0, "bytes_received": 1 << 20,
              "queue_depth": 3, "epoch": 0.1, "source": "stream", "samples_per_s": 300.0}
    out = {}
    with tempfile.TemporaryDirectory() as folder:
        Run.folder = Path(folder)
        metrics = server_metrics(type("Server", (), {"policy": None, "open_sessions": 0})())
        for name, observers in (("tensorboard", [board_factory()(Run)]),
                                ("trace+histogram", [RunTrace(), metrics.observer(Run)])):
            t0 = time.perf_counter()
            for i in range(n):
                record["step"], record["time"] = i + 1, float(i)
                for o in observers:
                    o.step(Run, record)
            out[name] = 1e6 * (time.perf_counter() - t0) / n
            for o in observers:
                o.end(Run)
            if name == "tensorboard":  # the board's own thread has written every event by now
                out["tensorboard, its writer thread included"] = 1e6 * (time.perf_counter() - t0) / n
    return out


def observe_table(args) -> list[dict]:
    """Each case as variants off / tensorboard / scraped, interleaved over rounds (their order rotating);
    the best and the median round of each."""
    best: dict[tuple, dict] = {}
    rates: dict[tuple, list[float]] = {}
    for case in args.cases.split(","):
        mode, pooling = case.split("/")
        bodies = make_bodies(mode, args.rows, args.tokens, args.pool)
        for r in range(args.observe_rounds):  # each round starts with the next variant: no fixed position
            for variant in OBSERVE_VARIANTS[r % 3:] + OBSERVE_VARIANTS[:r % 3]:
                row = bench_case(mode, pooling, args, variant, bodies)
                key = (mode, pooling, variant)
                rates.setdefault(key, []).append(row["samples_per_s"])
                if key not in best or row["samples_per_s"] > best[key]["samples_per_s"]:
                    best[key] = row
    rows = list(best.values())
    print(f"best of {args.observe_rounds} interleaved rounds; device={args.device} rows/batch={args.rows} "
          f"samples/run={args.samples} threads={args.threads}")
    print("| mode | pooling | variant | best samples/s | vs off | median samples/s | vs off | scrapes in the best run "
          "| server ms per scrape | loop waiting (best run) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        key, off_key = (r["mode"], r["pooling"], r["variant"]), (r["mode"], r["pooling"], "off")
        off, median, off_median = best[off_key]["samples_per_s"], np.median(rates[key]), np.median(rates[off_key])
        serve = f"{r['serve_ms']:.2f}" if r["serve_ms"] is not None else "-"
        print(f"| {r['mode']} | {r['pooling']} | {r['variant']} | {r['samples_per_s']:.1f} | "
              f"{100 * (r['samples_per_s'] / off - 1):+.1f}% | {median:.1f} | {100 * (median / off_median - 1):+.1f}% | "
              f"{r['scrapes']} | {serve} | {100 * r['wait_frac']:.0f}% |")
    costs = observer_step_us()
    print("training thread, per step: " + ", ".join(f"{k} {v:.0f} us" for k, v in costs.items()))
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="server torch device: cpu or cuda")
    parser.add_argument("--samples", type=int, default=1024, help="samples streamed per case")
    parser.add_argument("--rows", type=int, default=16, help="rows (samples) per batch")
    parser.add_argument("--tokens", type=int, default=128, help="mean real tokens per row in tokens mode")
    parser.add_argument("--pool", type=int, default=4, help="distinct pre-quantized batches cycled by the device")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in the server (default torch's)")
    parser.add_argument("--warmup-steps", type=int, default=5, help="steps left out of the averages")
    parser.add_argument("--cases", default=",".join(f"{m}/{p}" for m, p in CASES), help="mode/pooling list")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--observe-rounds", type=int, default=0,
                        help="measure what TensorBoard and 1 Hz scraping of /metrics + /status.json cost instead: "
                             "this many interleaved rounds of the variants off / tensorboard / scraped (0: off)")
    args = parser.parse_args(argv)
    if args.observe_rounds:
        rows = observe_table(args)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=2))
        return
    rows = [bench_case(*case.split("/"), args) for case in args.cases.split(",")]
    print(f"device={args.device} rows/batch={args.rows} mean tokens/row={args.tokens} samples/case={args.samples}")
    print("| mode | pooling | KiB/batch | server samples/s | MB/s in | step ms | train loop waiting |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['mode']} | {r['pooling']} | {r['bytes_per_batch'] / 1024:.0f} | {r['samples_per_s']:.0f} | "
              f"{r['mb_per_s']:.1f} | {r['step_ms']:.1f} | {100 * r['wait_frac']:.0f}% |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
