"""Where the benchmarks find the checkout and the shared data beside it, in one place.

The benchmarks run from a checkout (`pip install -e .` maps bench/ to `mobillm.bench`; a wheel
does not ship it), so the repository root is this folder's parent and ../shared/data sits beside it.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the repository root
SHARED_DATA = ROOT.parent / "shared" / "data"
TOKENIZER = SHARED_DATA / "tokenizer" / "opt"  # the real OPT tokenizer, when ../shared has it
GLUE = SHARED_DATA / "glue"
