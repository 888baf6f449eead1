"""One numbering of the formats (kernels/codec.py): the C enum and the wire ids derive from it."""

import re
from pathlib import Path

from mobillm.common import wire
from mobillm.kernels import codec

HEADER = Path(__file__).resolve().parents[2] / "kernels" / "cpp" / "block_quant.h"


def c_enum(name: str) -> dict[str, int]:
    """NAME -> value of `enum name { A = 0, B = 1, ... }` in block_quant.h."""
    body = re.search(r"enum\s+" + name + r"\s*\{([^}]*)\}", HEADER.read_text()).group(1)
    return {k: int(v) for k, v in re.findall(r"(\w+)\s*=\s*(\d+)", body)}


def test_c_enum_is_the_codec_table():
    assert c_enum("mobillm_format") == {f"MOBILLM_{fmt.upper()}": code for fmt, code in codec.FORMAT_CODES.items()}


def test_wire_ids_are_one_based_and_unchanged():
    # The bytes on the wire: changing any of these breaks every deployed device.
    assert wire.FORMAT_IDS == {"int8": 1, "fp8": 2, "int4": 3, "nf4": 4, "fp16": 5, "fp4": 6}
    assert wire.FORMAT_NAMES == {v: k for k, v in wire.FORMAT_IDS.items()}
