"""--weights gguf: the GGUF's own quantized tensors in the engine, held by ONNX Runtime operators
without a second rounding.

The fp32 graph traced from the GGUF's conversion holds exactly the dequantized GGUF tensors
(export/gguf.py), so each MatMul weight / embedding table of that graph is found by value among
the GGUF's tensors, and replaced by an operator that computes with the GGUF's own codes and scales:

    GGUF type  values                        ONNX Runtime operator (com.microsoft)
    Q8_0       d * q, q int8, blocks of 32    MatMulNBits / GatherBlockQuantized bits=8, block 32, code q + 128
    Q5_0       d * (q - 16), q 5-bit, 32      bits=8, block 32, code q + 112 (ORT has no 5-bit: 8 bits stored)
    Q4_0       d * (q - 8), q 4-bit, 32       bits=4, block 32, code q (default zero point 8)
    Q4_K       d*sc*q - dmin*m, sub-blocks 32 bits=4, block 32, scale d*sc, float zero point dmin*m / (d*sc)
    Q6_K       d*sc*(q - 32), sub-blocks 16   bits=8, block 16, code q + 96 (ORT has no 6-bit: 8 bits stored)
    F32, F16   floats                         kept as an fp32 initializer

ORT dequantizes a block as (code - zero_point) * scale. Every product above is exact in fp32
(an fp16 times integers of at most 13 bits), so the weights ORT computes with equal the GGUF's
dequantized values bit for bit, except Q4_K, whose float zero point is one fp32 division (the
dequantized weight is then within a few fp32 ulps of the reference). A type without a row here is
"widened": stored as fp32 (its exact dequantized values), and the exporter names each such tensor;
with `widen=False` it raises GGUFWidening instead (exit 2, nothing written).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .options import ExportError

MS_DOMAIN = "com.microsoft"


class GGUFWidening(ExportError):
    """A GGUF tensor type no ONNX Runtime operator holds exactly, and widening was not allowed (exit 2)."""


@dataclass
class Blocks:
    """A [rows, cols] weight as ORT block quantization: w[r, b*block + i] = (codes - zp) * scales."""

    codes: np.ndarray  # uint8 [rows, n_blocks, block], unpacked, 0 .. 2**bits - 1
    scales: np.ndarray  # float32 [rows, n_blocks]
    zero_points: np.ndarray | None  # float32 [rows, n_blocks]; None: the operator's default 2**(bits - 1)
    bits: int
    block: int

    def dequantize(self) -> np.ndarray:
        """float32 [rows, cols], as ORT computes it (reference for the tests)."""
        zp = np.float32(2 ** (self.bits - 1)) if self.zero_points is None else self.zero_points[..., None]
        w = (self.codes.astype(np.float32) - zp) * self.scales[..., None]
        return w.reshape(self.codes.shape[0], -1)

    @classmethod
    def symmetric(cls, w: np.ndarray, bits: int, block: int) -> "Blocks":
        """Absmax blocks of `block` values along each row of float32 `w` [rows, cols] (cols a multiple of
        `block`): codes offset by the operators' default zero point 2**(bits - 1), so -(2**(bits-1) - 1) ..
        2**(bits-1) - 1 around it."""
        rows, cols = w.shape
        half = 2 ** (bits - 1)
        wb = w.reshape(rows, cols // block, block)
        scales = (np.abs(wb).max(-1) / (half - 1)).astype(np.float32)
        step = np.where(scales == 0, np.float32(1), scales)[..., None]
        codes = np.clip(np.rint(wb / step), 1 - half, half - 1) + half
        return cls(codes.astype(np.uint8), scales, None, bits, block)

    def packed(self) -> np.ndarray:
        """uint8 [rows, n_blocks, block * bits / 8], codes low nibble first (MatMulNBits' B)."""
        if self.bits == 8:
            return self.codes
        pairs = self.codes.reshape(*self.codes.shape[:2], -1, 2)
        return (pairs[..., 0] | (pairs[..., 1] << 4)).astype(np.uint8)


def _f16(raw: np.ndarray) -> np.ndarray:
    return raw.view(np.float16).astype(np.float32)[..., 0]


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[n, 16] bytes -> [n, 32] codes: low nibbles are elements 0..15, high nibbles 16..31 (ggml)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _float_zero_points(scale: np.ndarray, offset: np.ndarray, codes: np.ndarray):
    """(scales, zero points, codes) for w = scale*q - offset: zp = offset/scale. A block whose scale is
    0 holds the constant -offset: written as scale=offset, codes 0, zp 1."""
    zero = scale == 0
    safe = np.where(zero, 1, scale)
    zp = np.where(zero, np.where(offset == 0, 0, 1), offset / safe).astype(np.float32)
    scales = np.where(zero, offset, scale).astype(np.float32)
    codes = np.where(zero[..., None], 0, codes).astype(np.uint8)
    return scales, zp, codes


def unpack(raw: np.ndarray, type_name: str, rows: int, cols: int) -> Blocks | None:
    """The GGUF tensor's raw bytes (uint8, as GGUFReader gives them) as Blocks; None when the type has no
    exact ORT form (the caller widens it)."""
    data = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    if type_name == "Q8_0":
        b = data.reshape(-1, 34)
        codes = (b[:, 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        return Blocks(codes.reshape(rows, -1, 32), _f16(b[:, :2]).reshape(rows, -1), None, 8, 32)
    if type_name == "Q5_0":
        b = data.reshape(-1, 22)
        qh = b[:, 2:6].copy().view(np.uint32)[:, 0]
        high = ((qh[:, None] >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)
        codes = (_nibbles(b[:, 6:]) | (high << 4)) + 112  # q - 16 == code - 128
        return Blocks(codes.reshape(rows, -1, 32), _f16(b[:, :2]).reshape(rows, -1), None, 8, 32)
    if type_name == "Q4_0":
        b = data.reshape(-1, 18)
        return Blocks(_nibbles(b[:, 2:]).reshape(rows, -1, 32), _f16(b[:, :2]).reshape(rows, -1), None, 4, 32)
    if type_name == "Q4_K":
        from gguf.quants import Q4_K

        b = data.reshape(-1, 144)
        d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
        sc, m = Q4_K.get_scale_min(b[:, 4:16].copy())
        qs = b[:, 16:].reshape(-1, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
        codes = (qs & 0x0F).reshape(-1, 8, 32)
        scale = d[:, None] * sc.astype(np.float32)  # exact: fp16 x 6-bit integer
        offset = dmin[:, None] * m.astype(np.float32)
        scales, zp, codes = _float_zero_points(scale, offset, codes)
        return Blocks(codes.reshape(rows, -1, 32), scales.reshape(rows, -1), zp.reshape(rows, -1), 4, 32)
    if type_name == "Q6_K":
        b = data.reshape(-1, 210)
        ql, qh, sc, d = b[:, :128], b[:, 128:192], b[:, 192:208], _f16(b[:, 208:210])
        low = (ql.reshape(-1, 2, 1, 64) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)) & 0x0F
        high = (qh.reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)) & 0x03
        q = low.reshape(-1, 2, 4, 32) | (high.reshape(-1, 2, 4, 32) << 4)  # 0..63, value q - 32
        codes = (q.reshape(-1, 16, 16) + 96).astype(np.uint8)
        scales = d[:, None] * sc.view(np.int8).astype(np.float32)
        return Blocks(codes.reshape(rows, -1, 16), scales.reshape(rows, -1), None, 8, 16)
    return None


FLOAT_TYPES = ("F32", "F16")


def gguf_tensors(path: Path):
    """(name, type name, rows, cols, raw bytes) of every 2-D tensor of the GGUF (rows = ne1, cols = ne0)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    for t in reader.tensors:
        if len(t.shape) != 2:
            continue
        cols, rows = (int(x) for x in t.shape)
        yield t.name, t.tensor_type.name, rows, cols, t.data


def dequantize(raw: np.ndarray, type_name: str, rows: int, cols: int) -> np.ndarray:
    """float32 [rows, cols]: gguf.quants' reference dequantization (what transformers loads)."""
    import gguf

    return gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[type_name]).reshape(rows, cols).astype(np.float32)


def weight_users(graph, inits):
    """{initializer: [(node, kind)]}: kind "matmul" (B of a MatMul, W = B.T) or "gather" (Gather axis 0 table)."""
    from onnx import helper

    users: dict[str, list] = {}
    for node in graph.node:
        for k, name in enumerate(node.input):
            if name in inits:
                users.setdefault(name, []).append((node, k))
    found = {}
    for name, uses in users.items():
        init = inits[name]
        if len(init.dims) != 2 or init.data_type != 1:
            continue
        kinds = set()
        for node, k in uses:
            axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 0)
            if node.op_type == "MatMul" and k == 1:
                kinds.add("matmul")
            elif node.op_type == "Gather" and k == 0 and axis == 0:
                kinds.add("gather")
            else:
                kinds.add("other")
        if len(kinds) == 1 and "other" not in kinds:
            found[name] = (kinds.pop(), [n for n, _ in uses])
    return found


def swap_in(model, replace: dict, removed: set, new_inits: list) -> None:
    """In place: each node whose first output names a key of `replace` becomes that node, the `removed`
    initializers go, `new_inits` come, and the com.microsoft operator set (MatMulNBits,
    GatherBlockQuantized) is imported."""
    from onnx import helper

    graph = model.graph
    nodes = [replace.get(n.output[0], n) if n.output else n for n in graph.node]
    del graph.node[:]
    graph.node.extend(nodes)
    keep = [i for i in graph.initializer if i.name not in removed]
    del graph.initializer[:]
    graph.initializer.extend(keep + new_inits)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))


def block_initializers(blocks: Blocks, base: str, kind: str) -> list:
    """The initializers `block_node` reads: BASE/codes, BASE/scales (and BASE/zero_points when float), laid out
    for MatMulNBits (`kind` "matmul": W = B.T) or GatherBlockQuantized ("gather", a table quantized along axis 1)."""
    from onnx import numpy_helper

    rows = blocks.codes.shape[0]
    flat = kind == "matmul"
    out = [numpy_helper.from_array(blocks.packed() if flat else blocks.packed().reshape(rows, -1), base + "/codes"),
           numpy_helper.from_array(blocks.scales.reshape(-1) if flat else blocks.scales, base + "/scales")]
    if blocks.zero_points is not None:
        zp = blocks.zero_points.reshape(-1) if flat else blocks.zero_points
        out.append(numpy_helper.from_array(zp, base + "/zero_points"))
    return out


def block_node(node, blocks: Blocks, base: str, kind: str, accuracy_level: int = 0):
    """The com.microsoft node that replaces MatMul / Gather `node`, computing with `blocks` (stored by
    `block_initializers` under `base`); keeps the node's output names."""
    from onnx import helper

    zp = [base + "/zero_points"] if blocks.zero_points is not None else []
    name = (node.name or node.output[0]) + "/" + base.split("/")[0]
    if kind == "matmul":
        rows, n_blocks = blocks.scales.shape
        return helper.make_node("MatMulNBits", [node.input[0], base + "/codes", base + "/scales", *zp],
                                list(node.output), name=name, domain=MS_DOMAIN, K=n_blocks * blocks.block, N=rows,
                                bits=blocks.bits, block_size=blocks.block, accuracy_level=accuracy_level)
    return helper.make_node("GatherBlockQuantized", [base + "/codes", node.input[1], base + "/scales", *zp],
                            list(node.output), name=name, domain=MS_DOMAIN, bits=blocks.bits,
                            block_size=blocks.block, gather_axis=0, quantize_axis=1)


def apply(model, gguf_file: Path, widen: bool = True, progress: bool = True) -> dict:
    """Replace the graph's weights that are GGUF tensors by operators holding the GGUF's codes (in place);
    returns the manifest's weight_quant record. Raises GGUFWidening for an unheld type when `widen` is False."""
    from onnx import numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    candidates = weight_users(graph, inits)
    # Index by what the weight is as a GGUF row-major [rows, cols] array: shape and first column.
    index: dict[tuple, list[str]] = {}
    arrays = {}
    for name, (kind, _) in candidates.items():
        arr = numpy_helper.to_array(inits[name])
        w = arr.T if kind == "matmul" else arr
        arrays[name] = w
        index.setdefault((w.shape, w[:, 0].tobytes()), []).append(name)
    held: dict[str, dict] = {}
    widened: list[dict] = []
    kept_float: list[str] = []
    nodes_to_replace: dict[int, object] = {}
    removed = set()
    new_inits = []
    for gname, type_name, rows, cols, raw in gguf_tensors(gguf_file):
        ref = dequantize(raw, type_name, rows, cols)
        names = [n for n in index.get(((rows, cols), ref[:, 0].tobytes()), []) if np.array_equal(arrays[n], ref)]
        if not names:
            continue
        name = names[0]
        kind, users = candidates[name]
        if type_name in FLOAT_TYPES:
            kept_float.append(gname)
            continue
        blocks = unpack(raw, type_name, rows, cols)
        if blocks is None:
            if not widen:
                raise GGUFWidening(f"GGUF tensor {gname} has type {type_name}, which no ONNX Runtime operator "
                                   f"holds exactly; allow widening (drop --no-widen) to store it as fp32")
            widened.append({"tensor": gname, "type": type_name, "stored_as": "fp32"})
            if progress:
                print(f"gguf: {gname} ({type_name}) has no exact ONNX Runtime form; stored as fp32 (its exact "
                      f"dequantized values)", file=sys.stderr)
            continue
        base = f"gguf/{gname}"
        new_inits += block_initializers(blocks, base, kind)
        for node in users:
            nodes_to_replace[node.output[0]] = block_node(node, blocks, base, kind, accuracy_level=0)
        removed.add(name)
        held[gname] = {"type": type_name, "op": "MatMulNBits" if kind == "matmul" else "GatherBlockQuantized",
                       "bits": blocks.bits, "block_size": blocks.block,
                       "zero_points": "float" if blocks.zero_points is not None else "default"}
    if not held:
        raise ExportError(f"{gguf_file}: no weight of the traced graph equals a GGUF tensor; --weights gguf needs "
                          f"the engine traced from this GGUF's own conversion")
    swap_in(model, nodes_to_replace, removed, new_inits)
    unmatched = sorted(n for n in candidates if n not in removed and arrays[n].size >= 4096)
    by_type: dict[str, dict] = {}
    for rec in held.values():
        key = f"{rec['type']} {rec['op']}"
        row = by_type.setdefault(key, {k: rec[k] for k in ("op", "bits", "block_size", "zero_points")} | {"tensors": 0})
        row["tensors"] += 1
    if progress:
        summary = ", ".join(f"{t} x{r['tensors']} -> {r['op'] if r['op'] != 'MatMulNBits' else 'MatMulNBits'} "
                            f"bits={r['bits']} block {r['block_size']}" for t, r in sorted(by_type.items()))
        print(f"gguf: weights held exactly: {summary}", file=sys.stderr)
        if unmatched:
            print(f"gguf: {len(unmatched)} weights of the graph are no GGUF tensor, kept fp32", file=sys.stderr)
    return {"tool": "mobillm.export.gguf_weights", "gguf": str(gguf_file), "types": by_type, "widened": widened,
            "kept_float": kept_float, "unmatched_fp32": unmatched, "accuracy_level": 0}
