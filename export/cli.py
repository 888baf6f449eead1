"""`export-backbone`: turn a frozen decoder into a tapped, self-quantizing ONNX engine."""

import argparse


def build_parser() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog="export-backbone", description=__doc__)


def main(argv=None) -> int:
    build_parser().parse_args(argv)
    return 0
