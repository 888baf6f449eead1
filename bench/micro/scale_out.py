"""A federated trainer of 1, 2 and 4 ranks (torch.distributed, gloo) flooded by SimDevices.

For each rank count R, R `trainer serve --federated` processes are started with the environment
torchrun gives its workers (RANK, WORLD_SIZE, MASTER_ADDR/PORT; rank r on --port + r), and
--devices SimDevices in --device-procs child processes connect to rank 0 (the front door), follow
their redirect, and stream pre-quantized OPT-350m-sized pooled batches (bench/micro/trainer.py's taps)
as fast as their credits allow. From the ranks' metrics files, over the steps after warm-up:

  world samples/s   rows trained per wall second by the whole world (one shared network)
  MB/s in           BATCH bytes received per wall second, all ranks together
  step ms           mean world step (decode + forward + backward + all-reduce + AdamW), rank 0
  rows/step         mean rows one world step trained (all ranks' contributions)

Per-sample costs for docs/scale_out.md's budget come from the same runs (bytes per sample, step
time per sample on one rank) plus a decode-only timing of one batch in this process.

    python -m mobillm.bench.micro.scale_out                               # 1, 2, 4 ranks, 8 devices
    python -m mobillm.bench.micro.scale_out --ranks 1,2 --devices 4 --samples 256 --json out.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import struct
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from mobillm.bench.micro.trainer import TAPS, make_bodies
from mobillm.bench.server import TrainerServe, stop_all
from mobillm.common import wire
from mobillm.common.netsim import free_port


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def device_process(url: str, names: list[str], samples: int, rows: int, bodies: list[bytes], out) -> None:
    """Several SimDevices (threads) streaming pre-built bodies; each puts (name, error, seconds, bytes)."""
    from mobillm.edge_runtime.simulate import SimDevice, SyntheticTask

    def frame(seq: int, ids: np.ndarray) -> bytes:
        return wire.encode_frame(wire.MsgType.BATCH, None, struct.pack("<Q", seq) + bodies[seq % len(bodies)][8:])

    def one(name: str) -> None:
        device = SimDevice(url, SyntheticTask(TAPS, n_samples=samples), task="bench", mode="pooled", epochs=1,
                           batch_size=rows, device_id=name, frame_source=frame)
        result = device.run(timeout=900)
        out.put((name, result.error, result.seconds, result.bytes_sent, result.redirects))

    threads = [threading.Thread(target=one, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def start_world(size: int, runs: str, threads: int, tick_s: float) -> tuple[int, list[TrainerServe]]:
    port, master = free_port(), free_port()
    ranks = []
    for rank in range(size):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(master), OMP_NUM_THREADS=str(threads))
        ranks.append(TrainerServe(runs, "--federated", "--threads", threads, "--checkpoint-every", 10**9,
                                  "--bitplan-every", "0", "--tick-s", tick_s, port=port, env=env,
                                  log=Path(runs) / f"rank{rank}.log").launch())
    for server in ranks:
        server.wait_ready(timeout=300)
    return port, ranks


def bench_world(size: int, bodies: list[bytes], args) -> dict:
    with tempfile.TemporaryDirectory() as runs:
        port, ranks = start_world(size, runs, args.threads, args.tick_s)
        load_before = load_average()
        try:
            ctx = mp.get_context("spawn")
            out = ctx.Queue()
            names = [f"phone-{i}" for i in range(args.devices)]
            children = [ctx.Process(target=device_process, args=(f"ws://127.0.0.1:{port}/", names[p::args.device_procs],
                                                                 args.samples, args.rows, bodies, out))
                        for p in range(args.device_procs)]
            for c in children:
                c.start()
            results = [out.get(timeout=1800) for _ in names]
            for c in children:
                c.join()
        finally:
            codes = stop_all(ranks, timeout=120)
        errors = [r for r in results if r[1]]
        if errors or any(codes):
            raise RuntimeError(f"{size} ranks: device errors {errors[:2]}, rank exit codes {codes}")
        folder = Path(runs) / "fed-bench"
        files = [folder / ("metrics.jsonl" if r == 0 else f"metrics.rank{r}.jsonl") for r in range(size)]
        per_rank = [[json.loads(line) for line in f.read_text().splitlines()] for f in files]
    steps = per_rank[0]
    warm = min(args.warmup_steps, len(steps) // 4)
    t0, t1 = steps[warm]["time"], steps[-1]["time"]
    rows = sum(s["rows"] for s in steps[warm + 1:])
    received = sum(r[-1]["bytes_received"] for r in per_rank)
    return {"ranks": size, "devices": args.devices, "steps": len(steps), "world_samples_per_s": rows / (t1 - t0),
            "mb_per_s": received / 1e6 * (rows / sum(s["rows"] for s in steps)) / (t1 - t0),
            "step_ms": 1000 * float(np.mean([s["step_s"] for s in steps[warm:]])),
            "rows_per_step": float(np.mean([s["rows"] for s in steps[warm:]])),
            "rank_step_ms_per_row": 1000 * float(np.mean([s["step_s"] / max(s["rank_rows"], 1) for r in per_rank
                                                          for s in r[warm:] if s["rank_rows"]])),
            "bytes_per_sample": len(bodies[0]) / args.rows, "redirected": sum(bool(r[4]) for r in results),
            "load_before": load_before, "load_after": load_average()}


def decode_ms_per_sample(bodies: list[bytes], rows: int, repeats: int = 20) -> float:
    """Dequantizing one batch's taps with the server's torch codec (best of `repeats`), per sample."""
    import torch

    from mobillm.common import schema
    from mobillm.common.taps import TapSpec
    from mobillm.trainer.data import decode_rows, rows_for_model

    torch.set_num_threads(1)
    batch = wire.Batch.from_body(bodies[0])
    taps = [schema.load(TapSpec, t) for t in TAPS]
    data = rows_for_model(batch, "last")
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        decode_rows(data, taps, torch.device("cpu"))
        best = min(best, time.perf_counter() - t)
    return 1000 * best / rows


OPTIONS = [  # flag, type, default, help
    ("--ranks", str, "1,2,4", "rank counts to run, comma-separated"),
    ("--devices", int, 8, "SimDevices flooding the world"),
    ("--device-procs", int, 2, "child processes the devices are spread over"),
    ("--samples", int, 512, "samples each device streams"),
    ("--rows", int, 16, "rows (samples) per batch"),
    ("--pool", int, 4, "distinct pre-quantized batches cycled by each device"),
    ("--threads", int, 1, "torch threads per rank"),
    ("--tick-s", float, 0.05, "each rank's --tick-s"),
    ("--warmup-steps", int, 5, "world steps left out of the averages"),
]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag, kind, default, text in OPTIONS:
        parser.add_argument(flag, type=kind, default=default, help=text)
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    bodies = make_bodies("pooled", args.rows, 1, args.pool)
    rows = [bench_world(int(r), bodies, args) for r in args.ranks.split(",")]
    decode = decode_ms_per_sample(bodies, args.rows)
    print(f"{args.devices} SimDevices x {args.samples} pooled samples, {args.rows} rows/batch, "
          f"{rows[0]['bytes_per_sample']:.0f} B/sample, {args.threads} torch thread(s) per rank; "
          f"decode {decode:.3f} ms/sample (1 thread, best of 20)")
    print("| ranks | world samples/s | MB/s in | world step ms | rows/step | rank step ms/row | load avg before -> after |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['ranks']} | {r['world_samples_per_s']:.0f} | {r['mb_per_s']:.2f} | {r['step_ms']:.1f} | "
              f"{r['rows_per_step']:.1f} | {r['rank_step_ms_per_row']:.2f} | {r['load_before']} -> {r['load_after']} |")
    if args.json:
        args.json.write_text(json.dumps({"decode_ms_per_sample": decode, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
