"""The numbers printed in docs/formats.md, checked against the reference codec.

Nothing is parsed from the doc: the same hex strings are written here. If one of these
fails, the doc (or the codec) changed and the two must be brought back in line.
"""

import numpy as np
import pytest

from mobillm.kernels import codec

ROW = np.array([[4.0, -1.0, 0.5, -0.000001, 2.25, -3.0, 0.03, 1.75]], np.float32)


def hex_bytes(a: np.ndarray, dtype=None) -> str:
    a = np.ascontiguousarray(a, dtype=dtype) if dtype else np.ascontiguousarray(a)
    return a.tobytes().hex(" ")


@pytest.mark.parametrize("fmt,codes,scales", [
    ("int8", "7f e0 10 00 47 a1 01 38", "08 28"),
    ("fp8", "7e ee 66 00 78 fb 45 74", "92 20"),
    ("int4", "6f 89 3c b8", "92 38"),
    ("nf4", "4f 79 1d c7", "00 44"),
    ("fp16", "00 44 00 bc 00 38 11 80 80 40 00 c2 ae 27 00 3f", ""),
    ("none", "00 44 00 bc 00 38 11 80 80 40 00 c2 ae 27 00 3f", ""),
])
def test_worked_example(fmt, codes, scales):
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
    assert hex_bytes(enc.codes) == "7f e0 10 00 5f 81 02 7f"
    assert hex_bytes(enc.scales, "<f2") == "08 28 0c 26 0e 23"
    assert enc.scales[0].astype(np.float32).tolist() == [0.031494140625, 0.02362060546875, 0.0137786865234375]


def test_odd_row_example():
    enc = codec.encode(ROW[:, :7], "int4", 64)
    assert hex_bytes(enc.codes) == "6f 89 3c 08"
    assert hex_bytes(enc.scales, "<f2") == "92 38"


def test_nf4_tables_as_printed():
    table_bits = ["bf800000", "bf3239b1", "bf066b30", "beca32a0", "be91a24d", "be3d353f", "bdba7871", "00000000",
                  "3da2faff", "3e24cae3", "3e7c04dd", "3ead033a", "3ee1a4b8", "3f1007ab", "3f3913b3", "3f800000"]
    threshold_bits = ["bf591cd8", "bf1c5270", "beeb8480", "beadea76", "be703cec", "be0d38bc", "bd3a7871", "3d22faff",
                      "3df64862", "3e5067e0", "3e9582d4", "3ec753f9", "3f006d04", "3f248daf", "3f5c89da"]
    assert [f"{b:08x}" for b in codec.NF4_TABLE.view(np.uint32)] == table_bits
    assert [f"{b:08x}" for b in codec.NF4_THRESHOLDS.view(np.uint32)] == threshold_bits
    # The doc lists the thresholds whose exact midpoint rounded up to the fp32 threshold.
    exact_mid = (codec.NF4_TABLE[:-1].astype(np.float64) + codec.NF4_TABLE[1:]) / 2
    rounded_up = [k for k in range(15) if codec.NF4_THRESHOLDS[k] > exact_mid[k]]
    assert rounded_up == [0, 1, 3, 4, 12, 14]


def test_fp8_examples_as_printed():
    # y = x when absmax is 448 (scale 1).
    x = np.array([[448.0, 1.0625, 1.1875, 2.0**-10, 3 * 2.0**-10, -(2.0**-11)]], np.float32)
    assert hex_bytes(codec.encode(x, "fp8", 64).codes) == "7e 38 3a 00 02 00"


@pytest.mark.parametrize("fmt,per_element", [
    ("int8", (1.0625, 1.03125, 1.015625)), ("fp8", (1.0625, 1.03125, 1.015625)),
    ("int4", (0.5625, 0.53125, 0.515625)), ("nf4", (0.5625, 0.53125, 0.515625)), ("fp16", (2.0, 2.0, 2.0)),
])
def test_bytes_per_element_table(fmt, per_element):
    assert tuple(codec.bytes_per_row(fmt, 2048, b) / 2048 for b in (32, 64, 128)) == per_element


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
