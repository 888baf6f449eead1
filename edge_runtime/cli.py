"""`edge-run`: fine-tune from the device with forward passes only, then predict locally."""

import argparse


def build_parser() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog="edge-run", description=__doc__)


def main(argv=None) -> int:
    build_parser().parse_args(argv)
    return 0
