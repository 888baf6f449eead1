"""A small built-in sentiment sample (SST-2 layout) for the quickstart when ../shared is absent.

    python -m mobillm.common.sample OUT.tsv ROWS SEED
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

WORDS = {1: ["good", "great", "lovely", "superb", "fun", "moving", "witty"],
         0: ["bad", "awful", "dull", "boring", "poor", "tedious", "clumsy"]}
NOUNS = ["movie", "film", "story", "plot", "cast", "script"]


def write_sample(path: Path | str, rows: int, seed: int = 0) -> Path:
    """Write `rows` labelled sentences (`sentence<TAB>label`, header included)."""
    rng = np.random.default_rng(seed)
    lines = ["sentence\tlabel"]
    for i in range(rows):
        label = i % 2
        adjectives = " and ".join(str(w) for w in rng.choice(WORDS[label], size=int(rng.integers(1, 4))))
        lines.append(f"a {adjectives} {rng.choice(NOUNS)}\t{label}")
    path = Path(path)
    path.write_text("\n".join(lines) + "\n")
    return path


if __name__ == "__main__":
    write_sample(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 0)
