"""Does streaming slow the device down? Forward throughput while streaming vs standalone.

The same engine and the same batches are run twice in this process: once as plain forward
passes (the standalone baseline), once through `StreamClient` streaming to a trainer server
in another process. The ratio of the two rows/s figures is the overlap efficiency
(goal >= 0.95: the device never waits for the server).

    python -m mobillm.bench.micro.edge_overlap --model opt-125m --rows 512 --threads 1
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mobillm.bench.paths import GLUE, TOKENIZER
from mobillm.bench.server import TrainerServe

SST2 = GLUE / "SST-2" / "train.tsv"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="opt-125m")
    p.add_argument("--layers", type=int, default=None, help="override num_hidden_layers (smaller, faster)")
    p.add_argument("--rows", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-len", type=int, default=128)
    p.add_argument("--threads", type=int, default=1, help="ORT intra-op threads on the device (the server gets the rest)")
    p.add_argument("--engine", type=Path, default=None, help="reuse an engine folder instead of exporting")
    a = p.parse_args()

    from mobillm.common.sample import write_sample
    from mobillm.common.tasks import get_task
    from mobillm.edge_runtime.backbone import Backbone
    from mobillm.edge_runtime.data import load_examples
    from mobillm.edge_runtime.stream import StreamClient, TrainOptions

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        engine = a.engine
        if engine is None:
            engine = tmp / "engine"
            cmd = ["export-backbone", a.model, "--random-init", "--out", str(engine), "--quiet"]
            cmd += ["--tokenizer", str(TOKENIZER)] if TOKENIZER.is_dir() else []
            cmd += ["--set", f"num_hidden_layers={a.layers}"] if a.layers else []
            subprocess.run(cmd, check=True)
        data = SST2 if SST2.is_file() else write_sample(tmp / "train.tsv", a.rows)
        task = get_task("sst2")
        examples = load_examples(data, task, limit=a.rows)
        with TrainerServe(tmp / "runs", "--threads", "1") as server:
            bb = Backbone(engine, threads=a.threads)
            rows = []
            for mode in ("pooled", "tokens"):
                opts = TrainOptions(server=server.url, batch_size=a.batch_size, max_len=a.max_len,
                                    mode=mode, run=f"overlap-{mode}", progress=False)
                trainer = StreamClient(bb, examples, task, opts)
                t0 = time.perf_counter()
                for idx in trainer.batches:  # standalone: the same batches, forward only
                    bb.forward([trainer.rows[i] for i in idx])
                standalone = time.perf_counter() - t0
                stats = trainer.run()
                streaming = stats.stream_s  # until DONE left the device, not the server's final training
                rows.append((mode, len(examples), standalone, streaming, stats.forward_s, stats.bytes_sent))
    print(f"\nmodel {a.model}{f' ({a.layers} layers)' if a.layers else ''}, {len(examples)} rows, batch {a.batch_size}, "
          f"max_len {a.max_len}, device threads {a.threads}")
    print("| mode | standalone rows/s | streaming rows/s | ratio | forward s in stream | MB sent |")
    print("|---|---|---|---|---|---|")
    for mode, n, standalone, streaming, fwd, sent in rows:
        print(f"| {mode} | {n / standalone:.1f} | {n / streaming:.1f} | {standalone / streaming:.3f} | {fwd:.1f} | "
              f"{sent / 1e6:.2f} |")


if __name__ == "__main__":
    sys.exit(main())
