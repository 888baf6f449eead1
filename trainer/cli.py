"""`trainer`: the server that trains side networks from streamed activations.

  trainer serve  --runs runs/ [--cache] [--device cuda] [--resume]   serve devices over WebSocket
  trainer serve  --federated [--max-share 0.5]                        one shared side network per task
  trainer plot   RUN                                                  loss curves -> RUN/loss.png
  trainer export RUN                                                  re-export RUN/side_network.onnx
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .config import FedConfig, OptimConfig, ServerConfig, SideConfig


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trainer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    d, side, optim = ServerConfig(), SideConfig(), OptimConfig()

    s = sub.add_parser("serve", help="serve devices over WebSocket and train their side networks",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    s.add_argument("--host", default=d.host, help="interface to bind (keep 127.0.0.1 unless behind a proxy)")
    s.add_argument("--port", type=int, default=d.port, help="port to bind (0: any free port)")
    s.add_argument("--runs", default=d.runs_dir, help="folder holding one sub-folder per run")
    s.add_argument("--cache", action="store_true", help="cache the first epoch's quantized taps on disk and train "
                                                        "later epochs from it (the device streams one epoch)")
    s.add_argument("--device", default=d.device, help="torch device for decoding and training: cpu, cuda, cuda:N")
    s.add_argument("--resume", action="store_true", help="continue runs that have a checkpoint in --runs")
    s.add_argument("--token-file", type=Path, help="file holding a token every HELLO must carry")
    s.add_argument("--certfile", type=Path, default=None,
                   help="PEM certificate (chain): serve wss:// (TLS 1.2+); devices verify it with --ca")
    s.add_argument("--keyfile", type=Path, default=None, help="PEM private key for --certfile (if not inside it)")
    s.add_argument("--queue", type=int, default=d.queue_size, help="batches queued per run (= device credits)")
    s.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, help="steps between checkpoints")
    s.add_argument("--bitplan-every", type=int, default=d.bitplan_every, help="steps between BITPLAN messages (0: off)")
    s.add_argument("--max-frame", type=int, default=d.max_frame, help="largest accepted message, bytes")
    s.add_argument("--max-rows", type=int, default=d.max_rows, help="largest accepted batch, rows")
    s.add_argument("--max-tokens", type=int, default=d.max_tokens, help="largest accepted batch, tokens")
    s.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    s.add_argument("--bottleneck", type=int, default=side.bottleneck, help="adapter bottleneck r")
    s.add_argument("--activation", choices=["relu", "gelu"], default=side.activation, help="adapter activation")
    s.add_argument("--pooling", choices=["last", "mean"], default=side.pooling,
                   help="head input: last real token, or masked mean (needs mode tokens)")
    s.add_argument("--side-width", type=int, default=None, help="side network width (default: the first tap's)")
    s.add_argument("--lr", type=float, default=optim.lr, help="peak AdamW learning rate")
    s.add_argument("--weight-decay", type=float, default=optim.weight_decay, help="AdamW weight decay")
    s.add_argument("--warmup-ratio", type=float, default=optim.warmup_ratio, help="warm-up share of all samples")
    s.add_argument("--grad-clip", type=float, default=optim.grad_clip, help="max gradient norm (0: off)")
    s.add_argument("--seed", type=int, default=optim.seed, help="initialisation and cached-epoch order seed")
    s.add_argument("--cache-batch-size", type=int, default=None,
                   help="rows per step in cached epochs (default: the device's batch size)")
    fed = FedConfig()
    s.add_argument("--federated", action="store_true",
                   help="one shared side network per task for every device and backbone (docs/federated.md); "
                        "--side-width is then the shared width (default %d)" % fed.width)
    s.add_argument("--max-share", type=float, default=fed.max_share,
                   help="--federated: most of a sliding window of trained samples one device may contribute (1: no cap)")
    s.add_argument("--share-window", type=int, default=fed.share_window,
                   help="--federated: samples in the window --max-share is measured over")
    s.add_argument("--fed-slots", type=int, default=fed.slots,
                   help="--federated: slots of the shared network; taps map to them by relative depth")
    s.add_argument("--fed-warmup", type=int, default=fed.warmup_samples,
                   help="--federated: lr warm-up in samples, then lr * sqrt(warmup / samples)")
    s.add_argument("-v", "--verbose", action="store_true", help="debug logging")

    p = sub.add_parser("plot", help="write RUN/loss.png from RUN/metrics.jsonl")
    p.add_argument("run", help="run folder, or a run name under --runs")
    p.add_argument("--runs", default=d.runs_dir, help="folder holding the runs")
    p.add_argument("--out", type=Path, help="PNG path (default RUN/loss.png)")

    e = sub.add_parser("export", help="re-export RUN/side_network.onnx from RUN/checkpoint.pt")
    e.add_argument("run", help="run folder, or a run name under --runs")
    e.add_argument("--runs", default=d.runs_dir, help="folder holding the runs")
    return parser


def server_config(args: argparse.Namespace) -> ServerConfig:
    token = None
    if args.token_file is not None:
        if not args.token_file.is_file():
            raise SystemExit(f"trainer: --token-file {args.token_file} does not exist")
        token = args.token_file.read_text().strip()
        if not token:
            raise SystemExit(f"trainer: --token-file {args.token_file} is empty")
    config = ServerConfig(
        host=args.host, port=args.port, runs_dir=args.runs, cache=args.cache, device=args.device,
        resume=args.resume, token=token, queue_size=args.queue, checkpoint_every=args.checkpoint_every,
        bitplan_every=args.bitplan_every, max_frame=args.max_frame, max_rows=args.max_rows,
        max_tokens=args.max_tokens, threads=args.threads,
        certfile=str(args.certfile) if args.certfile else None, keyfile=str(args.keyfile) if args.keyfile else None,
        side=SideConfig(bottleneck=args.bottleneck, activation=args.activation, pooling=args.pooling,
                        side_width=args.side_width),
        optim=OptimConfig(lr=args.lr, weight_decay=args.weight_decay, warmup_ratio=args.warmup_ratio,
                          grad_clip=args.grad_clip, seed=args.seed, cache_batch_size=args.cache_batch_size),
        federated=args.federated,
        fed=FedConfig(slots=args.fed_slots, width=args.side_width or FedConfig.width, max_share=args.max_share,
                      share_window=args.share_window, warmup_samples=args.fed_warmup))
    try:
        config.validate()
    except ValueError as exc:
        raise SystemExit(f"trainer: {exc}") from None
    return config


def run_folder(args: argparse.Namespace) -> Path:
    folder = Path(args.run)
    if not folder.is_dir():
        folder = Path(args.runs) / args.run
    if not folder.is_dir():
        raise SystemExit(f"trainer: no run folder {args.run!r} (looked in . and {args.runs}/)")
    return folder


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "serve":
        config = server_config(args)
        if config.device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise SystemExit("trainer: --device cuda but torch sees no CUDA device; use --device cpu")
        from .server import TrainerServer

        TrainerServer(config).serve_forever()
    elif args.command == "plot":
        from .plot import plot_run

        print(plot_run(run_folder(args), args.out))
    elif args.command == "export":
        from .export import reexport

        path, diff = reexport(run_folder(args))
        print(f"{path} (max |onnx - torch| = {diff:.3g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
