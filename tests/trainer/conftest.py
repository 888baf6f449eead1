"""Shared fixtures: a real TrainerServer on 127.0.0.1 (free port) per test, tiny tap widths."""

import os

import pytest
import torch
from helpers import started_each

from mobillm.trainer.config import ServerConfig
from mobillm.trainer.server import TrainerServer

torch.set_num_threads(1)  # tiny models: intra-op threads only fight the receive loop on 2 cores

# Like OPT-350m in miniature: equal widths, then a narrower final tap (projected to the side width).
TAPS = [
    {"layer": 1, "hidden": 32, "fmt": "nf4", "block_size": 16},
    {"layer": 2, "hidden": 32, "fmt": "int8", "block_size": 16},
    {"layer": 3, "hidden": 16, "fmt": "nf4", "block_size": 16},
]


@pytest.fixture
def taps():
    return [dict(t) for t in TAPS]


@pytest.fixture
def start_server(tmp_path):
    """start_server(**ServerConfig overrides) -> a started TrainerServer; all are stopped at teardown."""
    # MOBILLM_TEST_DEVICE=cuda runs the same tests with decode + training on the GPU.
    defaults = {"port": 0, "runs_dir": str(tmp_path / "runs"), "threads": 1,
                "device": os.environ.get("MOBILLM_TEST_DEVICE", "cpu")}
    yield from started_each(lambda **overrides: TrainerServer(ServerConfig(**{**defaults, **overrides})))
