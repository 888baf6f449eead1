"""`trainer`: the server that trains side networks from streamed activations.

  trainer serve  --runs runs/ [--cache] [--device cuda] [--resume]   serve devices over WebSocket
  trainer serve  --federated [--max-share 0.5]                        one shared side network per task
  trainer serve  --profile paper [--device cuda]                      the paper's lr and fp16/AMP training
  trainer plot   RUN                                                  loss curves -> RUN/loss.png
  trainer export RUN                                                  re-export RUN/side_network.onnx

The serve flags are the fields of ServerConfig, SideConfig, OptimConfig and FedConfig (trainer/config.py).
Exit status: 0 done, 2 bad input (a flag, a config value, a missing file or run folder), 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from mobillm.common.errors import BadInput, run_command
from mobillm.common.options import HelpFormatter, Parser, add_options, all_but, from_args, read_token_file
from mobillm.common.profiles import add_profile_flag, parse_with_profile

from .config import FedConfig, OptimConfig, ServerConfig, SideConfig, WorldConfig


def build_parser(defaults: dict | None = None) -> argparse.ArgumentParser:
    """The `trainer` parser; `defaults` (a --profile's trainer values) replace the serve flags' defaults."""
    parser = Parser(prog="trainer", description=__doc__, formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="serve devices over WebSocket and train their side networks",
                       formatter_class=HelpFormatter)
    add_options(s, ServerConfig, defaults=defaults)
    add_profile_flag(s)
    s.add_argument("--token-file", type=Path, default=None,
                   help="file holding a token every HELLO must carry (default: no token asked)")
    s.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    add_options(s.add_argument_group("side network"), SideConfig, defaults=defaults)
    add_options(s.add_argument_group("optimizer"), OptimConfig, defaults=defaults)
    add_options(s.add_argument_group("federated (with --federated)"), FedConfig)
    add_options(s.add_argument_group("several ranks (launched by torchrun, docs/scale_out.md)"), WorldConfig)
    s.set_defaults(handler=cmd_serve)

    for name, text, handler in (("plot", "write RUN/loss.png from RUN/metrics.jsonl", cmd_plot),
                                ("export", "re-export RUN/side_network.onnx from RUN/checkpoint.pt", cmd_export)):
        p = sub.add_parser(name, help=text, description=text, formatter_class=HelpFormatter)
        p.add_argument("run", help="run folder, or a run name under --runs")
        add_options(p, ServerConfig, skip=all_but(ServerConfig, "runs_dir"))
        if name == "plot":
            p.add_argument("--out", type=Path, help="PNG path (default: RUN/loss.png)")
        p.set_defaults(handler=handler)
    return parser


def server_config(args: argparse.Namespace) -> ServerConfig:
    """The validated ServerConfig that `trainer serve`'s flags describe (ConfigError, exit 2, when it is not)."""
    # --side-width is the shared width with --federated (docs/federated.md); SideConfig keeps it either way.
    config = from_args(ServerConfig, args, token=read_token_file(args.token_file) if args.token_file else None,
                       side=from_args(SideConfig, args), optim=from_args(OptimConfig, args),
                       fed=from_args(FedConfig, args, width=args.side_width or FedConfig.width),
                       world=from_args(WorldConfig, args))
    config.validate()
    from .core import resolve_precision  # torch: imported only once the flags are known to be good

    precision, note = resolve_precision(config.optim.precision, config.device)
    if note:  # said once, before the port opens; the runs then train (and record) what this server can
        print(f"trainer: {note}", file=sys.stderr)
        config.optim.precision = precision
    return config


def run_folder(args: argparse.Namespace) -> Path:
    """RUN as given, or as a run name under --runs."""
    folder = Path(args.run)
    if not folder.is_dir():
        folder = Path(args.runs_dir) / args.run
    if not folder.is_dir():
        raise BadInput(f"no run folder {args.run!r} (looked in . and {args.runs_dir}/)")
    return folder


def cmd_serve(args: argparse.Namespace) -> None:
    config = server_config(args)
    if config.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise BadInput("--device cuda but torch sees no CUDA device; use --device cpu")
    from .distributed import World, check_world_file

    world = World.from_env()
    if world is not None:  # launched by torchrun: this process is one rank of the world
        from .distributed import serve_world

        serve_world(config, world)
        return
    if config.world != WorldConfig():
        raise BadInput("--rank-url, --tick-s and --world-timeout only apply to a world of ranks launched by "
                       "torchrun (docs/scale_out.md); this is a single process")
    check_world_file(config.runs_dir, 1, config.resume)
    from .server import TrainerServer

    TrainerServer(config).serve_forever()


def cmd_plot(args: argparse.Namespace) -> None:
    from .plot import plot_run

    print(plot_run(run_folder(args), args.out))


def cmd_export(args: argparse.Namespace) -> None:
    from .export import reexport

    path, diff = reexport(run_folder(args))
    print(f"{path} (max |onnx - torch| = {diff:.3g})")


def configure_logging(verbose: bool) -> None:
    """INFO, or DEBUG with -v; websockets stays at INFO even then: its DEBUG lines print request
    headers (Authorization: Bearer TOKEN), the status page's ?token= and the HELLO frame's bytes."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("websockets").setLevel(logging.INFO)


def main(argv=None) -> int:
    args = parse_with_profile(build_parser, argv, "trainer")
    configure_logging(getattr(args, "verbose", False))
    return run_command("trainer", lambda: args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
