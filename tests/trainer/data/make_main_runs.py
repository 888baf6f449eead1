"""How main_runs/ was made: run folders that the trainer before the one training loop (main at d0a0b28)
wrote, read by test_old_checkpoints.py. Run with that code on the path:

    python tests/trainer/data/make_main_runs.py tests/trainer/data/main_runs
"""

import shutil
import sys
from pathlib import Path

import torch

from mobillm.edge_runtime.simulate import SimDevice, SyntheticTask
from mobillm.trainer.config import FedConfig, ServerConfig, SideConfig
from mobillm.trainer.server import TrainerServer

SIDE = SideConfig(bottleneck=8)  # small files
TAPS = [{"layer": 1, "hidden": 32, "fmt": "nf4", "block_size": 16},
        {"layer": 2, "hidden": 32, "fmt": "int8", "block_size": 16},
        {"layer": 3, "hidden": 16, "fmt": "nf4", "block_size": 16}]
FAMILIES = [([{"layer": i, "hidden": 32, "fmt": "nf4", "block_size": 16} for i in (1, 2, 3, 4)], 4),
            ([{"layer": i, "hidden": 48, "fmt": "int8", "block_size": 16} for i in (2, 4, 6)], 6)]


def serve(runs: Path, **options) -> TrainerServer:
    server = TrainerServer(ServerConfig(port=0, runs_dir=str(runs), threads=1, side=SIDE, **options))
    server.start()
    return server


def main(out: Path) -> None:
    torch.set_num_threads(1)
    shutil.rmtree(out, ignore_errors=True)
    # Uninterrupted references: the final weights of a plain and a --cache run.
    for name, cache, samples, epochs in (("straight", False, 96, 2), ("straight-cached", True, 64, 3)):
        server = serve(out / "ref", cache=cache)
        SimDevice(server.url, SyntheticTask(TAPS, n_samples=samples), run=name, device_id="phone", epochs=epochs,
                  batch_size=8).run()
        server.stop()
        torch.save(torch.load(out / "ref" / name / "checkpoint.pt", weights_only=True)["model"], out / f"{name}.pt")
    shutil.rmtree(out / "ref")
    # The same runs stopped midway: mid-stream, and in the cached epochs.
    server = serve(out / "single", checkpoint_every=3)
    SimDevice(server.url, SyntheticTask(TAPS, n_samples=96), run="restarted", device_id="phone", epochs=2,
              batch_size=8).run(stop_after_batches=10)
    server.stop()
    server = serve(out / "cache", cache=True, checkpoint_every=2)
    SimDevice(server.url, SyntheticTask(TAPS, n_samples=64), run="cached", device_id="phone", epochs=3,
              batch_size=8).run(send_done=False)
    server.stop()
    # A federated run of two backbone families, stopped with both devices part-way.
    server = serve(out / "fed", federated=True, fed=FedConfig(width=32), checkpoint_every=5, bitplan_every=0)
    for i, (taps, layers) in enumerate(FAMILIES):
        SimDevice(server.url, SyntheticTask(taps, n_samples=64, seed=i), task="sst2", epochs=2, batch_size=16,
                  device_id=f"d{i}", num_layers=layers).run(send_done=False)
    server.stop()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
