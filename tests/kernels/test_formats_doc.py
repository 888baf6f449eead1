"""The numbers printed in docs/formats.md, read from the doc and checked against the reference codec.

The tables and hex strings are parsed from the markdown, so the doc cannot drift from the code:
if one of these fails, the doc (or the codec) changed and the two must be brought back in line.
"""

import re
from pathlib import Path

import numpy as np
import pytest

from mobillm.common import wire
from mobillm.kernels import codec

DOC = (Path(__file__).resolve().parents[2] / "docs" / "formats.md").read_text(encoding="utf-8")
ROW = np.array([[4.0, -1.0, 0.5, -0.000001, 2.25, -3.0, 0.03, 1.75]], np.float32)


def hex_bytes(a: np.ndarray, dtype=None) -> str:
    a = np.ascontiguousarray(a, dtype=dtype) if dtype else np.ascontiguousarray(a)
    return a.tobytes().hex(" ")


def section(title: str) -> str:
    """The text of the `## N. title` section."""
    return re.search(r"^## \d+\. " + re.escape(title) + r"\n(.*?)(?=^## |\Z)", DOC, re.S | re.M).group(1)


def table_rows(text: str, first: str) -> list[list[str]]:
    """Cells of the markdown table whose header row starts with `| first |`."""
    rows = []
    for line in text[text.index(f"| {first} |"):].splitlines()[2:]:  # after the header and |---| lines
        if not line.startswith("|"):
            break
        rows.append([c.strip().strip("`*") for c in line.strip("|").split("|")])
    return rows


def example(label: str) -> tuple[str, str]:
    """(codes, scales) hex strings printed after the bold `label` of the worked example."""
    m = re.search(r"\*\*" + re.escape(label) + r"\*\*.*?codes `([0-9a-f ]+)`, (?:scales `([0-9a-f ]+)`|no scales)",
                  section("Worked example"), re.S)
    return m.group(1), m.group(2) or ""


def test_format_table():
    rows = {r[0].split()[0].strip("`"): r for r in table_rows(DOC, "format")}
    assert list(rows) == list(codec.FORMATS)
    for fmt, (_, _, bits, qmax, _, wire_id) in rows.items():
        assert int(bits) == codec.BITS[fmt] and int(wire_id) == wire.FORMAT_IDS[fmt]
        assert qmax == "—" if fmt == "fp16" else int(qmax) == codec.QMAX[fmt]


@pytest.mark.parametrize("fmt", ["int8", "fp8", "int4", "nf4", "fp16", "none"])
def test_worked_example(fmt):
    codes, scales = example("fp16" if fmt == "none" else fmt)  # `none` is fp16's alias
    enc = codec.encode(ROW, fmt, 64)
    assert hex_bytes(enc.codes, "<f2" if enc.codes.dtype == np.float16 else None) == codes
    assert hex_bytes(enc.scales, "<f2") == scales


def test_worked_example_intermediates():
    # Values quoted in the prose of the worked example.
    assert [float(codec.block_scales(ROW, f, 64)[0, 0]) for f in ("int8", "fp8", "int4", "nf4")] == [
        0.031494140625, 0.0089263916015625, 0.5712890625, 4.0]
    y = ROW / np.float32(0.031494140625)
    assert np.float32(y[0, 0]) > 127  # the absmax element is clamped
    unpacked = {f: codec.unpack_nibbles(codec.encode(ROW, f, 64).codes, 8)[0].tolist() for f in ("int4", "nf4")}
    assert unpacked == {"int4": [15, 6, 9, 8, 12, 3, 8, 11], "nf4": [15, 4, 9, 7, 13, 1, 7, 12]}


def test_short_last_block_example():
    enc = codec.encode(ROW, "int8", 3)
    assert (hex_bytes(enc.codes), hex_bytes(enc.scales, "<f2")) == example("Short last block")
    assert enc.scales[0].astype(np.float32).tolist() == [0.031494140625, 0.02362060546875, 0.0137786865234375]


def test_odd_row_example():
    enc = codec.encode(ROW[:, :7], "int4", 64)
    assert (hex_bytes(enc.codes), hex_bytes(enc.scales, "<f2")) == example("Odd row")


def test_nf4_tables_as_printed():
    text = section("Code mapping per format")
    table_bits = [r[2].removeprefix("0x") for r in table_rows(text, "code")]
    threshold_bits = [r[3].removeprefix("0x") for r in table_rows(text, "k")]
    assert [f"{b:08x}" for b in codec.NF4_TABLE.view(np.uint32)] == table_bits
    assert [f"{b:08x}" for b in codec.NF4_THRESHOLDS.view(np.uint32)] == threshold_bits
    # The doc lists the thresholds whose exact midpoint rounded up to the fp32 threshold.
    listed = re.search(r"for k = ([\d, ]+) and (\d+) the exact midpoint", text)
    exact_mid = (codec.NF4_TABLE[:-1].astype(np.float64) + codec.NF4_TABLE[1:]) / 2
    rounded_up = [k for k in range(15) if codec.NF4_THRESHOLDS[k] > exact_mid[k]]
    assert rounded_up == [int(k) for k in listed.group(1).split(",")] + [int(listed.group(2))]


def test_fp8_examples_as_printed():
    # y = x when absmax is 448 (scale 1).
    x = np.array([[448.0, 1.0625, 1.1875, 2.0**-10, 3 * 2.0**-10, -(2.0**-11)]], np.float32)
    assert hex_bytes(codec.encode(x, "fp8", 64).codes) == "7e 38 3a 00 02 00"


def test_fp4_spec_as_printed():
    text = section("Code mapping per format")
    fp4 = text[text.index("### fp4"):text.index("### fp16")]
    mags = table_rows(fp4, "nibble m (sign 0)")[0][1:]
    assert [float(v) for v in mags] == codec.FP4_MAGNITUDES.tolist()
    ties = re.search(r"as values,\s+(.*?)\.(?!\d)", fp4, re.S).group(1)
    pairs = [p.split(" → ") for p in ties.replace("\n", " ").split(", ")]
    y = np.array([[6.0] + [float(a) for a, _ in pairs]], np.float32)
    decoded = codec.decode(codec.encode(y, "fp4", 64))[0, 1:]
    assert decoded.tolist() == [float(b) for _, b in pairs]
    m = re.search(r"y = ([-−\d., ]+)\s+packs to bytes `([0-9a-f ]+)`", fp4)
    x = np.array([[float(v.replace("−", "-")) for v in m.group(1).strip(" ,").split(", ")]], np.float32)
    assert hex_bytes(codec.encode(x, "fp4", 64).codes) == m.group(2)


def test_bytes_per_element_table():
    rows = table_rows(section("Size on the wire"), "format")
    assert [r[0] for r in rows] == list(codec.FORMATS)
    for fmt, _, *per_element in rows:
        assert tuple(codec.bytes_per_row(fmt, 2048, b) / 2048 for b in (32, 64, 128)) == tuple(map(float, per_element))


def test_limits_as_printed():
    # Underflow: a/QMAX <= 2^-25 gives scale 0; saturation: scale is at most 65504.
    for fmt, q in codec.QMAX.items():
        at = np.full((1, 4), q * 2.0**-25, np.float32)
        assert codec.block_scales(at, fmt, 64)[0, 0] == 0
        assert codec.block_scales(np.nextafter(at, np.float32(1)), fmt, 64)[0, 0] > 0
        big = np.full((1, 4), q * 65504 * 2, np.float32)
        assert codec.decode(codec.encode(big, fmt, 64)).max() == np.float32(q * 65504)
    assert hex_bytes(codec.encode(np.zeros((1, 4), np.float32), "int4", 64).codes) == "88 88"
    assert hex_bytes(codec.encode(np.zeros((1, 4), np.float32), "nf4", 64).codes) == "77 77"
