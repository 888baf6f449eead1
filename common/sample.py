"""Built-in stand-ins for real data and models: a synthetic sentiment sample (SST-2 layout) for the
quickstart when ../shared is absent, and the tiny OPT config that tests and benchmarks export.

    python -m mobillm.common.sample OUT.tsv ROWS SEED

Every synthetic sentiment row of the project (quickstart, benchmarks, tests) comes from
`sentences`; its keywords pick the style, so that each caller's rows stay the same as before.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterator

import numpy as np

WORDS = {1: ["good", "great", "lovely", "superb", "fun", "moving", "witty"],
         0: ["bad", "awful", "dull", "boring", "poor", "tedious", "clumsy"]}
NOUNS = ["movie", "film", "story", "plot", "cast", "script"]

# An OPT small enough to export and verify in a few seconds (hidden 64, 4 layers); the real
# vocabulary size keeps the real OPT tokenizer usable. Overrides for `export-backbone opt-125m --set`.
TINY_OPT = {
    "hidden_size": 64,
    "num_hidden_layers": 4,
    "ffn_dim": 128,
    "num_attention_heads": 4,
    "word_embed_proj_dim": 64,
    "max_position_embeddings": 256,
    "vocab_size": 50272,
}


def sentences(rows: int, seed: int = 0, *, adjectives: tuple[int, int] = (1, 3), vocabulary: int = len(WORDS[0]),
              noun: str | None = None, numbered: bool = False, balanced: bool = True) -> Iterator[tuple[str, int]]:
    """(sentence, label) pairs: "a <adjective> and <adjective> <noun>", positive or negative words.

    adjectives: how many (min, max) per row; vocabulary: how many words of each WORDS list are used;
    noun: a fixed noun (None: drawn from NOUNS); numbered: prefix "row <i>: " (distinct texts);
    balanced: labels alternate 0, 1 (False: each drawn at random)."""
    rng = np.random.default_rng(seed)
    for i in range(rows):
        label = i % 2 if balanced else int(rng.integers(2))
        words = [str(w) for w in rng.choice(WORDS[label][:vocabulary], size=int(rng.integers(adjectives[0],
                                                                                          adjectives[1] + 1)))]
        what = str(rng.choice(NOUNS)) if noun is None else noun
        yield f"{'row %d: ' % i if numbered else ''}a {' and '.join(words)} {what}", label


def write_sample(path: Path | str, rows: int, seed: int = 0, **style) -> Path:
    """Write `rows` labelled sentences (`sentence<TAB>label`, header included); `style`: see `sentences`."""
    lines = ["sentence\tlabel"] + [f"{text}\t{label}" for text, label in sentences(rows, seed, **style)]
    path = Path(path)
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    """`python -m mobillm.common.sample OUT.tsv ROWS [SEED]`, under the error policy (exit 2, one line)."""
    from mobillm.common.errors import BadInput, run_command
    from mobillm.common.options import Parser

    p = Parser(prog="python -m mobillm.common.sample", description="Write the synthetic sentiment sample (SST-2 "
                                                                   "layout: sentence<TAB>label).")
    p.add_argument("out", type=Path, help="the .tsv file to write")
    p.add_argument("rows", type=int, help="how many rows")
    p.add_argument("seed", type=int, nargs="?", default=0, help="which rows (default: 0)")
    args = p.parse_args(argv)
    if args.rows < 1:
        p.error(f"ROWS must be at least 1, got {args.rows}")

    def write() -> None:
        try:
            write_sample(args.out, args.rows, args.seed)
        except OSError as exc:
            raise BadInput(f"cannot write {args.out}: {exc.strerror or exc}") from None

    return run_command(p.prog, write)


if __name__ == "__main__":
    sys.exit(main())
