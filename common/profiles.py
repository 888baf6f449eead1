"""Named settings profiles (`--profile paper`), one table for both sides.

A profile only changes defaults: each side's CLI reads `--profile` first, then parses with the
profile's values as the flags' defaults, so a flag given explicitly always wins
(`--profile paper --lr 1e-3` trains at 1e-3). Keys are the config dataclass fields the flags
come from (`trainer.config`, `edge_runtime.stream.TrainOptions`).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Callable


@dataclass(frozen=True)
class Profile:
    help: str
    trainer: dict = field(default_factory=dict)  # `trainer serve` (OptimConfig, SideConfig, ServerConfig fields)
    device: dict = field(default_factory=dict)  # `edge-run` (TrainOptions fields)


PROFILES = {
    # MobiLLM's Table II setting: fp16 training, batch 16, sequence 256, lr 5e-4, 20 epochs.
    "paper": Profile("the MobiLLM paper's setting: lr 5e-4 and fp16/AMP training (fp32 on a CPU server) on the "
                     "server; batch 16, max-len 256, 20 epochs on the device",
                     trainer={"lr": 5e-4, "precision": "fp16"},
                     device={"batch_size": 16, "max_len": 256, "epochs": 20}),
}


def add_profile_flag(parser) -> None:
    parser.add_argument("--profile", choices=sorted(PROFILES), default=None,
                        help="defaults from a named setting; explicit flags override it ("
                             + "; ".join(f"{name}: {p.help}" for name, p in PROFILES.items()) + ") (default: none)")


def parse_with_profile(build_parser: Callable[[dict], argparse.ArgumentParser], argv, side: str) -> argparse.Namespace:
    """Parse `argv` with `build_parser(defaults)`, the defaults being the `side` ("trainer" or
    "device") values of the --profile that `argv` names, if any (so `--help` shows them too)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--profile", nargs="?")  # a missing name is the real parser's one-line error
    name = pre.parse_known_args(argv)[0].profile
    # An unknown name falls through to the real parser, which refuses it (exit 2, listing the choices).
    return build_parser(getattr(PROFILES[name], side) if name in PROFILES else {}).parse_args(argv)
