"""`trainer`: the server that trains the side network from streamed activations."""

import argparse


def build_parser() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog="trainer", description=__doc__)


def main(argv=None) -> int:
    build_parser().parse_args(argv)
    return 0
