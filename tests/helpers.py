"""What several test folders share: the synthetic sentiment rows they train on and the
start-many, stop-all-at-teardown shape of their server and proxy fixtures.

Importable as `helpers` from any test module or conftest (pyproject.toml puts tests/ on the
pytest pythonpath). The tiny OPT config lives in the package (mobillm.common.sample.TINY_OPT)
because bench/ exports it too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator, TypeVar

from mobillm.common.sample import write_sample

T = TypeVar("T")

# The tests' sentiment rows: 2..8 of five positive or negative words before "movie".
TEST_ROWS = {"adjectives": (2, 8), "vocabulary": 5, "noun": "movie"}


def write_rows(path: Path, n: int, seed: int = 0, **style) -> Path:
    """An SST-2-style TSV of `n` rows (labels alternate unless `balanced=False`); `style` overrides
    TEST_ROWS (see mobillm.common.sample.sentences)."""
    return write_sample(path, n, seed, **{**TEST_ROWS, **style})


def started_each(factory: Callable[..., T]) -> Iterator[Callable[..., T]]:
    """The body of a fixture that yields make(*args, **kw) -> factory(*args, **kw), started; every
    object made is stopped at teardown. Use as `yield from started_each(LinkProxy)`."""
    made: list = []

    def make(*args, **kwargs) -> T:
        obj = factory(*args, **kwargs)
        obj.start()
        made.append(obj)
        return obj

    yield make
    for obj in made:
        obj.stop()
