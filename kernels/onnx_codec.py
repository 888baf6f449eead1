"""The codec as a standard-op ONNX subgraph (opset >= 18), inserted after each tap.

It follows `codec.py` step for step so ONNX Runtime produces the same bytes. Ops are chosen
to be exact: comparisons, Gather from tables of powers of two and fp32 Div/Round, never
approximate math. Tensors keep a single leading axis inside the subgraph and are reshaped
back to the tap's leading dims at the end, so any rank works.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from . import codec
from .native import OP_DOMAIN as CUSTOM_DOMAIN, OP_VERSION as CUSTOM_OPSET

OPSET = 18

# The fused native op (kernels/cpp/ort_op.cpp, kernels/cuda, kernels/trt; docs/native.md).
QUANT_OPS = ("onnx", "custom")


@dataclass
class Subgraph:
    """Nodes and initializers to splice into a graph, and the names of the two outputs."""

    nodes: list = field(default_factory=list)
    initializers: list = field(default_factory=list)
    codes: str = ""
    scales: str = ""


class _Builder:
    def __init__(self, prefix: str):
        self.prefix = prefix
        self.sub = Subgraph()
        self._n = 0

    def name(self, hint: str) -> str:
        self._n += 1
        return f"{self.prefix}/{hint}_{self._n}"

    def const(self, value, dtype=np.float32, hint: str = "c") -> str:
        name = self.name(hint)
        self.sub.initializers.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, op_type: str, inputs: list[str], hint: str | None = None, **attrs) -> str:
        out = self.name(hint or op_type.lower())
        self.sub.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out


def merge_opsets(model, other) -> None:
    """`model` imports every op set `other` uses, each at the higher of the two versions (and the
    higher IR version): what grafting `other`'s nodes (a quantized weight, a side network) needs."""
    have = {o.domain: o for o in model.opset_import}
    for o in other.opset_import:
        if o.domain not in have:
            model.opset_import.append(o)
        elif have[o.domain].version < o.version:
            have[o.domain].version = o.version
    model.ir_version = max(model.ir_version, other.ir_version)


def quantize_subgraph(x: str, fmt: str, block_size: int, hidden: int, prefix: str,
                      dtype: int = TensorProto.FLOAT) -> Subgraph:
    """Nodes that turn tap `x` [..., hidden] (fp32/fp16, `dtype`) into `codes` (uint8) and `scales` (fp16).

    For `fp16` the codes output is the tap cast to float16 and scales is empty [..., 0].
    Per-element work is kept to ops ONNX Runtime's CPU provider runs fast: no element-wise
    Where (its broadcasting kernel costs ~50x an Add) and no search Gathers; the per-block
    corrections (NaN scale, zero scale) are done on the scales, 1/block_size of the data.
    `block_size` codec.PER_TENSOR (0): one block of the whole tensor, its scale repeated per row.
    """
    fmt = codec.check_format(fmt)
    b = _Builder(prefix)
    lead = b.op("Shape", [x], "lead_shape", end=-1)
    if fmt == "fp16":
        sat = b.op("Clip", [x, b.const(-codec.FP16_MAX, _NP[dtype]), b.const(codec.FP16_MAX, _NP[dtype])], "saturated")
        b.sub.codes = sat if dtype == TensorProto.FLOAT16 else b.op("Cast", [sat], "codes", to=TensorProto.FLOAT16)
        empty_shape = b.op("Concat", [lead, b.const([0], np.int64)], "empty_shape", axis=0)
        b.sub.scales = b.op("ConstantOfShape", [empty_shape], "scales",
                            value=helper.make_tensor("v", TensorProto.FLOAT16, [1], [0]))
        return b.sub

    xf = x if dtype == TensorProto.FLOAT else b.op("Cast", [x], "x_f32", to=TensorProto.FLOAT)
    per_tensor = block_size == codec.PER_TENSOR
    nb, block_size = codec.n_blocks(hidden, block_size), codec.row_block_size(hidden, block_size)
    pad = nb * block_size - hidden
    qmax = codec.QMAX[fmt]
    x2 = b.op("Reshape", [xf, b.const([-1, hidden], np.int64)], "rows")
    if pad:
        x2 = b.op("Pad", [x2, b.const([0, pad], np.int64), b.const(0.0), b.const([-1], np.int64)], "padded")
    xb = b.op("Reshape", [x2, b.const([-1, nb, block_size], np.int64)], "blocks")
    block_axes = b.const([0, 1, 2] if per_tensor else [-1], np.int64, "block_axes")  # what one scale covers

    # Steps 1-2: fp16 scale of each block. x * 0 is 0 for finite x and NaN for NaN/Inf, so the
    # block sum `poison` is 0 or NaN; adding it marks non-finite blocks, Abs makes the NaN positive
    # (fp16 0x7E00, as codec.block_scales).
    absmax = b.op("ReduceMax", [b.op("Abs", [xb]), block_axes], "absmax", keepdims=1)
    poison = b.op("ReduceSum", [b.op("Mul", [xb, b.const(0.0)]), block_axes], "poison", keepdims=1)
    scale32 = b.op("Min", [b.op("Div", [absmax, b.const(qmax)]), b.const(codec.FP16_MAX)], "scale32")
    marked = b.op("Cast", [b.op("Abs", [b.op("Add", [scale32, poison])])], "scale16", to=TensorProto.FLOAT16)
    scales_shape = b.op("Concat", [lead, b.const([nb], np.int64)], "scales_shape", axis=0)
    if per_tensor:  # [1, 1, 1] -> one copy per row (Expand broadcasts it to [1, rows..., 1])
        marked = b.op("Expand", [marked, scales_shape], "scale_per_row")
    b.sub.scales = b.op("Reshape", [marked, scales_shape], "scales")

    # Step 3: y = x / scale, clamped to [-qmax, qmax]. A zero scale divides by 2^100 instead,
    # which sends the block's (tiny) values to codes of exactly 0 in every format. y uses the
    # unmarked scale, so in a non-finite block only the NaN elements' own codes are lost.
    sf = b.op("Cast", [b.op("Cast", [scale32], to=TensorProto.FLOAT16)], "scale_f32", to=TensorProto.FLOAT)
    zero = b.op("Cast", [b.op("Equal", [sf, b.const(0.0)])], "scale_is_zero", to=TensorProto.FLOAT)
    safe = b.op("Add", [sf, b.op("Mul", [zero, b.const(2.0**100)])], "safe_scale")
    y = b.op("Clip", [b.op("Div", [xb, safe]), b.const(-qmax), b.const(qmax)], "y_clamped")
    y = b.op("Reshape", [y, b.const([-1, nb * block_size], np.int64)], "y_rows")
    if pad:
        y = b.op("Slice", [y, b.const([0], np.int64), b.const([hidden], np.int64), b.const([-1], np.int64)], "y_trim")

    # Step 4: codes as uint8 (4-bit ones as exact floats, then packed two to a byte).
    codes = {"int8": _int8_codes, "int4": _int4_codes, "nf4": _nf4_codes, "fp8": _fp8_codes,
             "fp4": _fp4_codes}[fmt](b, y)
    if codec.BITS[fmt] == 4:
        codes = _pack_nibbles(b, codes, hidden)
    codes_shape = b.op("Concat", [lead, b.const([codec.code_bytes(fmt, hidden)], np.int64)], "codes_shape", axis=0)
    b.sub.codes = b.op("Reshape", [codes, codes_shape], "codes")
    return b.sub


_NP: dict[int, type] = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16}


def _int8_codes(b: _Builder, y: str) -> str:
    # QuantizeLinear with scale 1 rounds half to even (as np.rint) and saturates; y is already
    # within +-127. A NaN (non-finite block) gives some code in range; its scale says NaN.
    q = b.op("QuantizeLinear", [y, b.const(1.0), b.const(0, np.int8)], "int8_code")
    return b.op("Cast", [q], "int8_twos", to=TensorProto.UINT8)  # two's complement bits


def _int4_codes(b: _Builder, y: str) -> str:
    # As int8; the nibble code + 8 comes back as an exact float for packing.
    q = b.op("QuantizeLinear", [y, b.const(1.0), b.const(8, np.uint8)], "int4_nibble")
    return b.op("Cast", [q], "int4_f32", to=TensorProto.FLOAT)


# nf4 by bucket: [-1, 1] cut into 2 * _NF4_K equal buckets, each holding at most one threshold,
# none closer to a bucket edge than the rounding error of (y + 1) * K. A value's bucket gives the
# number of thresholds below the bucket (`base`) and the one inside it (`inner`, +inf if none);
# code = base + (y > inner) is then exact even when y lands in the neighbouring bucket.
_NF4_K = 64


def _nf4_tables(k: int = _NF4_K) -> tuple[np.ndarray, np.ndarray]:
    edges = np.arange(2 * k + 1, dtype=np.float64) / k - 1
    thresholds = codec.NF4_THRESHOLDS.astype(np.float64)
    base = np.array([np.sum(thresholds < lo) for lo in edges[:-1]], np.float32)
    inner = np.full(2 * k, np.inf, np.float32)
    for j, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
        inside = codec.NF4_THRESHOLDS[(thresholds >= lo) & (thresholds < hi)]
        if len(inside) > 1:
            raise ValueError(f"nf4 bucket {j} holds {len(inside)} thresholds; use more buckets")
        if len(inside):
            inner[j] = inside[0]
    margin = np.min(np.abs(thresholds[:, None] - edges[None, :]))
    if margin <= 2.0**-22:  # (y + 1) rounds by <= 2^-24; keep a wide safety factor
        raise ValueError(f"an nf4 threshold lies {margin:g} from a bucket edge; choose another bucket count")
    return base, inner


def _nf4_codes(b: _Builder, y: str) -> str:
    base, inner = _nf4_tables()
    pos = b.op("Mul", [b.op("Add", [y, b.const(1.0)]), b.const(float(_NF4_K))], "nf4_pos")  # y in [-1, 1]
    # Truncation is floor here (pos >= 0); a NaN (non-finite block) casts to some integer, which
    # the integer Clip brings back into the table, so the session never fails on it.
    idx = b.op("Clip", [b.op("Cast", [pos], to=TensorProto.INT64), b.const(0, np.int64),
                        b.const(2 * _NF4_K - 1, np.int64)], "nf4_bucket")
    above = b.op("Greater", [y, b.op("Gather", [b.const(inner, hint="nf4_inner"), idx], axis=0)])
    code = b.op("Add", [b.op("Gather", [b.const(base, hint="nf4_base"), idx], axis=0),
                        b.op("Cast", [above], to=TensorProto.FLOAT)], "nf4_code")
    return code


def _fp8_codes(b: _Builder, y: str) -> str:
    # NaN elements (their block's scale is already NaN) become 0: the exponent Gathers below need
    # an index in range. fp8 and fp4 are the formats that need this element-wise Where.
    y = b.op("Where", [b.op("IsNaN", [y]), b.const(0.0), y], "y_finite")
    # Powers of two by table lookup keep every step exact; entry i holds 2**(i - 12).
    pow2 = b.const([2.0**k for k in range(-12, 11)], hint="pow2")

    def two_to(e_float: str) -> str:
        idx = b.op("Cast", [b.op("Add", [e_float, b.const(12.0)])], to=TensorProto.INT64)
        return b.op("Gather", [pow2, idx], axis=0)

    a = b.op("Abs", [y], "a")
    e = b.op("Floor", [b.op("Mul", [b.op("Log", [b.op("Max", [a, b.const(2.0**-10)])]), b.const(1 / math.log(2))])])
    e = b.op("Max", [b.op("Min", [e, b.const(9.0)]), b.const(-11.0)], "e_guess")
    # Correct the one-ulp errors of Log exactly, as codec._fp8_bits does.
    e = b.op("Sub", [e, b.op("Cast", [b.op("Greater", [two_to(e), a])], to=TensorProto.FLOAT)])
    e_plus = b.op("Add", [e, b.const(1.0)])
    e = b.op("Add", [e, b.op("Cast", [b.op("LessOrEqual", [two_to(e_plus), a])], to=TensorProto.FLOAT)], "e")
    exp = b.op("Max", [e, b.const(-6.0)], "exp")
    quantum = two_to(b.op("Sub", [exp, b.const(3.0)]))
    r = b.op("Mul", [b.op("Round", [b.op("Div", [a, quantum])]), quantum], "r")
    carried = b.op("GreaterOrEqual", [r, two_to(b.op("Add", [exp, b.const(1.0)]))])
    er = b.op("Add", [exp, b.op("Cast", [carried], to=TensorProto.FLOAT)], "er")
    mant = b.op("Div", [r, two_to(b.op("Sub", [er, b.const(3.0)]))])
    bits = b.op("Add", [b.op("Mul", [b.op("Add", [er, b.const(6.0)]), b.const(8.0)]), mant], "fp8_mag")
    negative = b.op("And", [b.op("Less", [y, b.const(0.0)]), b.op("Greater", [r, b.const(0.0)])])
    sign = b.op("Mul", [b.op("Cast", [negative], to=TensorProto.FLOAT), b.const(128.0)])
    return b.op("Cast", [b.op("Add", [bits, sign])], "fp8_bits", to=TensorProto.UINT8)


def _fp4_codes(b: _Builder, y: str) -> str:
    # codec._fp4_codes by segments of equal spacing: |y| in [0, 2) steps 0.5 (codes 0-4), [2, 4)
    # steps 1 (codes 4-6), [4, 6] steps 2 (codes 6-7). code = offset + Round((a - base) / step):
    # a - base and the division by a power of two are exact, and Round's half-to-even gives the
    # even code at every midpoint because each segment's offset is even. NaN elements become 0
    # first, or they would spoil the other nibble of their byte.
    y = b.op("Where", [b.op("IsNaN", [y]), b.const(0.0), y], "y_finite")
    a = b.op("Abs", [y], "a")
    ge2 = b.op("Cast", [b.op("GreaterOrEqual", [a, b.const(2.0)])], to=TensorProto.FLOAT)
    ge4 = b.op("Cast", [b.op("GreaterOrEqual", [a, b.const(4.0)])], to=TensorProto.FLOAT)
    base = b.op("Mul", [b.op("Add", [ge2, ge4]), b.const(2.0)], "fp4_base")  # 0, 2, 4
    inv_step = b.op("Sub", [b.op("Sub", [b.const(2.0), ge2]), b.op("Mul", [ge4, b.const(0.5)])], "fp4_inv_step")
    offset = b.op("Add", [b.op("Mul", [ge2, b.const(4.0)]), b.op("Mul", [ge4, b.const(2.0)])], "fp4_offset")
    mag = b.op("Add", [offset, b.op("Round", [b.op("Mul", [b.op("Sub", [a, base]), inv_step])])], "fp4_mag")
    negative = b.op("And", [b.op("Less", [y, b.const(0.0)]), b.op("Greater", [mag, b.const(0.0)])])
    return b.op("Add", [mag, b.op("Mul", [b.op("Cast", [negative], to=TensorProto.FLOAT), b.const(8.0)])], "fp4_code")


def _pack_nibbles(b: _Builder, codes: str, hidden: int) -> str:
    # Codes 0..15 as exact floats: element 2i + 16 * element 2i+1, one Cast to uint8. (uint8
    # BitShift/BitwiseAnd with a broadcast constant are ~40x slower than this in ORT 1.32's CPU provider.)
    if hidden % 2:
        codes = b.op("Pad", [codes, b.const([0, 1], np.int64), b.const(0.0), b.const([-1], np.int64)], "pad_odd")
    pairs = b.op("Reshape", [codes, b.const([-1, (hidden + 1) // 2, 2], np.int64)], "pairs")
    packed = b.op("ReduceSum", [b.op("Mul", [pairs, b.const([1.0, 16.0])]), b.const([-1], np.int64)], "packed",
                  keepdims=0)
    return b.op("Cast", [packed], "packed_u8", to=TensorProto.UINT8)


def dequantize_subgraph(codes: str, scales: str, fmt: str, block_size: int, hidden: int, prefix: str) -> tuple[list, list, str]:
    """Nodes that turn one tap's flat rows back into fp32, as `codec.decode_arrays`: `codes` [rows, code_bytes]
    (uint8; fp16 format: float16 [rows, hidden]) and `scales` [rows, n_blocks] (fp16) -> [rows, hidden].

    value(code) comes from `codec.code_values` by Gather (4-bit codes unpacked low nibble first) and is
    multiplied by its block's fp32 scale: the same fp32 product as the reference, so the same bits.
    Returns (nodes, initializers, output name)."""
    fmt = codec.check_format(fmt)
    b = _Builder(prefix)
    if fmt == "fp16":
        return b.sub.nodes, b.sub.initializers, b.op("Cast", [codes], "values", to=TensorProto.FLOAT)
    c = b.op("Cast", [codes], "codes_i64", to=TensorProto.INT64)
    if codec.BITS[fmt] == 4:
        hi = b.op("Div", [c, b.const(16, np.int64)], "hi")
        lo = b.op("Sub", [c, b.op("Mul", [hi, b.const(16, np.int64)])], "lo")
        pairs = b.op("Concat", [b.op("Unsqueeze", [lo, b.const([-1], np.int64)]),
                                b.op("Unsqueeze", [hi, b.const([-1], np.int64)])], "pairs", axis=-1)
        flat = b.op("Reshape", [pairs, b.const([0, -1], np.int64)], "nibbles")
        c = b.op("Slice", [flat, b.const([0], np.int64), b.const([hidden], np.int64), b.const([-1], np.int64)],
                 "codes_h")
    values = b.op("Gather", [b.const(codec.code_values(fmt), np.float32, "table"), c], "values", axis=0)
    nb, bs = codec.n_blocks(hidden, block_size), codec.row_block_size(hidden, block_size)
    s = b.op("Unsqueeze", [b.op("Cast", [scales], "scales_f32", to=TensorProto.FLOAT), b.const([-1], np.int64)])
    s = b.op("Mul", [s, b.const(np.ones(bs, np.float32), hint="ones")], "scale_blocks")  # [rows, nb, bs], exact
    s = b.op("Reshape", [s, b.const([0, nb * bs], np.int64)], "scale_rows")
    if nb * bs != hidden:
        s = b.op("Slice", [s, b.const([0], np.int64), b.const([hidden], np.int64), b.const([-1], np.int64)], "scale_h")
    return b.sub.nodes, b.sub.initializers, b.op("Mul", [values, s], "decoded")


def standalone_dequantizer(fmt: str, block_size: int, hidden: int) -> onnx.ModelProto:
    """A model holding only `dequantize_subgraph`: `codes`, `scales` -> `values` [rows, hidden]."""
    fmt = codec.check_format(fmt)
    if fmt == "fp16":
        codes = helper.make_tensor_value_info("codes", TensorProto.FLOAT16, ["rows", hidden])
    else:
        codes = helper.make_tensor_value_info("codes", TensorProto.UINT8, ["rows", codec.code_bytes(fmt, hidden)])
    nb = 0 if fmt == "fp16" else codec.n_blocks(hidden, block_size)
    scales = helper.make_tensor_value_info("scales", TensorProto.FLOAT16, ["rows", nb])
    nodes, inits, out = dequantize_subgraph("codes", "scales", fmt, block_size, hidden, "dq")
    nodes.append(helper.make_node("Identity", [out], ["values"]))
    graph = helper.make_graph(nodes, "dequantize", [codes, scales],
                              [helper.make_tensor_value_info("values", TensorProto.FLOAT, ["rows", hidden])],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    onnx.checker.check_model(model)
    return model


def append_quantizers(model: onnx.ModelProto, taps: list[dict], op: str = "onnx",
                      rows: str | None = None, switch: tuple[str, list[str]] | None = None) -> onnx.ModelProto:
    """Replace each tap output of `model` by its quantized pair (codes, scales), in place.

    `taps` items: {"output": graph output name, "fmt", "block_size", "hidden",
    "codes": new output name, "scales": new output name}.
    `op="onnx"` (default) inserts the standard-op subgraph, which any ONNX Runtime runs;
    `op="custom"` inserts one fused com.mobillm node per tap (`custom_quantize_node`), which
    needs the native library registered with the session (`mobillm.kernels.native.register`).
    Both produce the same bytes.
    `rows`: the name of a new graph input, int64 [rows], of flat indices into the taps' leading
    dims (batch * seq); each tap is gathered to those rows before it is quantized, so only the
    rows that leave the device are quantized, and codes/scales come out [rows, ...].
    `switch` = (input name, formats): also a run-time format choice per tap, see `append_format_switch`.
    """
    if op not in QUANT_OPS:
        raise ValueError(f"unknown quantizer op {op!r}; choose one of {', '.join(QUANT_OPS)}")
    graph = model.graph
    by_name = {o.name: o for o in graph.output}
    if rows is not None:
        graph.input.append(helper.make_tensor_value_info(rows, TensorProto.INT64, [ROWS_DIM]))
    sources = {}  # tap output -> (what its quantizers read, leading dims): shared by several formats of one tap
    for tap in taps:
        out = by_name[tap["output"]]
        dtype = out.type.tensor_type.elem_type
        if tap["output"] not in sources:
            x, lead = tap["output"], _leading_dims(out)
            if rows is not None:
                # Named after the tap, not its codes: fuse_quantizers takes every "<codes>/" node as quantizer.
                x, lead = _gather_rows(graph, x, rows, tap["hidden"], tap["output"] + "/rows"), [ROWS_DIM]
            sources[tap["output"]] = x, lead
        x, lead = sources[tap["output"]]
        if switch is not None and "tap" in tap:
            append_format_switch(graph, x, tap, switch[0], switch[1], dtype, len(lead) + 1)
        if op == "custom":
            graph.node.append(custom_quantize_node(x, tap["fmt"], tap["block_size"], tap["codes"], tap["scales"]))
        else:
            sub = quantize_subgraph(x, tap["fmt"], tap["block_size"], tap["hidden"], prefix=tap["codes"], dtype=dtype)
            graph.node.extend(sub.nodes)
            graph.initializer.extend(sub.initializers)
            graph.node.extend([
                helper.make_node("Identity", [sub.codes], [tap["codes"]], name=tap["codes"] + "/out"),
                helper.make_node("Identity", [sub.scales], [tap["scales"]], name=tap["scales"] + "/out"),
            ])
        fmt = codec.check_format(tap["fmt"])
        codes_type = TensorProto.FLOAT16 if fmt == "fp16" else TensorProto.UINT8
        width = tap["hidden"] if fmt == "fp16" else codec.code_bytes(fmt, tap["hidden"])
        nb = 0 if fmt == "fp16" else codec.n_blocks(tap["hidden"], tap["block_size"])
        if out in graph.output:
            graph.output.remove(out)
        graph.output.extend([
            helper.make_tensor_value_info(tap["codes"], codes_type, lead + [width]),
            helper.make_tensor_value_info(tap["scales"], TensorProto.FLOAT16, lead + [nb]),
        ])
    if switch is not None:
        graph.input.append(helper.make_tensor_value_info(switch[0], TensorProto.INT64, [len(sources)]))
    if op == "custom" and taps and not any(o.domain == CUSTOM_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(CUSTOM_DOMAIN, CUSTOM_OPSET))
    return model


ROWS_DIM = "rows"


def switch_outputs(tap: int) -> dict[str, str]:
    """Names of tap `tap`'s run-time-format outputs: byte-format codes and scales, fp16 values."""
    return {"codes": f"tap{tap}_sel_codes", "scales": f"tap{tap}_sel_scales", "fp16": f"tap{tap}_sel_fp16"}


def append_format_switch(graph, x: str, tap: dict, selector: str, formats: list[str], dtype: int, rank: int) -> None:
    """Outputs of tap `tap["tap"]` in the format the int64 graph input `selector`[tap] picks (an index
    into `formats`), chosen at run time by ONNX If nodes: only the chosen quantizer runs (ONNX Runtime
    computes every node of a graph whatever outputs are fetched; docs/export.md). A byte format fills
    `sel_codes` (uint8) and `sel_scales`; fp16 fills `sel_fp16` (float16 [..., hidden]); the outputs
    not chosen are empty ([0, ...]). Same bytes as `quantize_subgraph`, which builds each branch."""
    names = switch_outputs(tap["tap"])
    prefix = f"tap{tap['tap']}_sel"
    pick = f"{prefix}/pick"
    dims = [None] * rank  # rank known, sizes not: an unselected output is empty
    graph.initializer.append(numpy_helper.from_array(np.array(tap["tap"], np.int64), pick + "_index"))
    graph.node.append(helper.make_node("Gather", [selector, pick + "_index"], [pick], name=pick, axis=0))

    def empty(name: str, elem: int) -> onnx.NodeProto:
        return helper.make_node("Constant", [], [name], name=name + "/empty",
                                value=helper.make_tensor(name + "/v", elem, [0] * rank, []))

    def branch(fmt: str, outs: list[tuple[str, int]], depth: int) -> onnx.GraphProto:
        """The subgraph producing `outs` in `fmt`."""
        tag = f"{prefix}/{fmt}_{depth}"
        inner = [(f"{tag}/{name.rsplit('_', 1)[1]}", elem) for name, elem in outs]
        sub = quantize_subgraph(x, fmt, tap["block_size"], tap["hidden"], prefix=tag, dtype=dtype)
        srcs = [sub.codes] if fmt == "fp16" else [sub.codes, sub.scales]
        nodes = sub.nodes + [helper.make_node("Identity", [s_], [n], name=n) for s_, (n, _) in zip(srcs, inner)]
        return helper.make_graph(nodes, tag, [], [helper.make_tensor_value_info(n, e, dims) for n, e in inner],
                                 initializer=sub.initializers)

    def chain(choices: list[tuple[int, str]], outs: list[tuple[str, int]], depth: int = 0) -> list:
        """Nodes making `outs`: If(pick == k0) fmt0 else If(pick == k1) fmt1 ... else empty."""
        if not choices:
            return [empty(n, e) for n, e in outs]
        (k, fmt), rest = choices[0], choices[1:]
        cond = f"{prefix}/{fmt}_{depth}/is"
        const = cond + "_k"
        graph.initializer.append(numpy_helper.from_array(np.array(k, np.int64), const))
        renamed = [(f"{prefix}/{fmt}_{depth}/else_{n.rsplit('_', 1)[1]}", e) for n, e in outs]
        else_graph = helper.make_graph(chain(rest, renamed, depth + 1), cond + "_else", [],
                                       [helper.make_tensor_value_info(n, e, dims) for n, e in renamed])
        return [helper.make_node("Equal", [pick, const], [cond], name=cond),
                helper.make_node("If", [cond], [n for n, _ in outs], name=f"{prefix}/{fmt}_{depth}/if",
                                 then_branch=branch(fmt, outs, depth), else_branch=else_graph)]

    byte = [(k, f) for k, f in enumerate(formats) if f != "fp16"]
    half = [(k, f) for k, f in enumerate(formats) if f == "fp16"]
    graph.node.extend(chain(byte, [(names["codes"], TensorProto.UINT8), (names["scales"], TensorProto.FLOAT16)]))
    graph.node.extend(chain(half, [(names["fp16"], TensorProto.FLOAT16)]))
    graph.output.extend([helper.make_tensor_value_info(names["codes"], TensorProto.UINT8, dims),
                         helper.make_tensor_value_info(names["scales"], TensorProto.FLOAT16, dims),
                         helper.make_tensor_value_info(names["fp16"], TensorProto.FLOAT16, dims)])


def _gather_rows(graph, x: str, rows: str, hidden: int, prefix: str) -> str:
    """x [..., hidden] -> x.reshape(-1, hidden)[rows]: the rows that leave, before any quantizer."""
    shape = f"{prefix}/rows_shape"
    graph.initializer.append(numpy_helper.from_array(np.array([-1, hidden], np.int64), shape))
    flat, picked = f"{prefix}/flat", f"{prefix}/picked"
    graph.node.extend([helper.make_node("Reshape", [x, shape], [flat], name=flat),
                       helper.make_node("Gather", [flat, rows], [picked], name=picked, axis=0)])
    return picked


def fuse_quantizers(model: onnx.ModelProto, taps: list[dict]) -> onnx.ModelProto:
    """Replace each tap's standard-op quantizer in a finished graph by one com.mobillm node, in place.

    The graph may have been rewritten since `append_quantizers` (weights quantized by ORT, rows
    gathered before the quantizer): the subgraph is found by its node names (prefix
    `tap["codes"]`/...), and its one non-constant input is what the fused node quantizes. Weights
    are untouched, so the result can share the standard graph's external-data file.
    """
    graph = model.graph
    initializers = {i.name for i in graph.initializer}
    fused: list = []
    all_prefixes: tuple[str, ...] = ()
    for tap in taps:
        prefixes = (tap["codes"] + "/", tap["scales"] + "/")
        all_prefixes += prefixes
        sub = [n for n in graph.node if n.name.startswith(prefixes)]
        made = {o for n in sub for o in n.output}
        sources = {i for n in sub for i in n.input if i and i not in made and i not in initializers}
        if len(sources) != 1:
            raise ValueError(f"tap {tap['codes']}: expected one input into its quantizer, found {sorted(sources)}")
        for node in sub:
            graph.node.remove(node)
        fused.append(custom_quantize_node(sources.pop(), tap["fmt"], tap["block_size"], tap["codes"], tap["scales"]))
    used = {i for n in graph.node for i in n.input}
    for init in [i for i in graph.initializer if i.name not in used and i.name.startswith(all_prefixes)]:
        graph.initializer.remove(init)
    for info in [v for v in graph.value_info if v.name not in used and v.name.startswith(all_prefixes)]:
        graph.value_info.remove(info)
    graph.node.extend(fused)
    if not any(o.domain == CUSTOM_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(CUSTOM_DOMAIN, CUSTOM_OPSET))
    return model


def custom_op_type(fmt: str) -> str:
    """Op type of the fused node for `fmt`: the fp16 format, whose codes are float16, has its own
    (ONNX Runtime infers a custom op's output types from its input types alone)."""
    return "BlockQuantizeFp16" if codec.check_format(fmt) == "fp16" else "BlockQuantize"


def custom_quantize_node(x: str, fmt: str, block_size: int, codes: str, scales: str) -> onnx.NodeProto:
    """One com.mobillm node: x [..., H] (float/float16) -> codes, scales, as `quantize_subgraph`."""
    fmt = codec.check_format(fmt)
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    return helper.make_node(custom_op_type(fmt), [x], [codes, scales], name=codes + "/quantize",
                            domain=CUSTOM_DOMAIN, format=fmt, block_size=int(block_size))


def _leading_dims(value_info) -> list:
    dims = value_info.type.tensor_type.shape.dim
    return [d.dim_param or (d.dim_value if d.HasField("dim_value") else None) for d in dims[:-1]]


def standalone_model(fmt: str, block_size: int, hidden: int, rank: int = 3,
                     input_dtype: int = TensorProto.FLOAT, op: str = "onnx", rows: str | None = None,
                     switch: tuple[str, list[str]] | None = None) -> onnx.ModelProto:
    """A model holding only the quantize subgraph: input `x` [..., hidden] -> `codes`, `scales`.

    `op`, `rows` (an extra int64 input of flat row indices) and `switch` (run-time formats: outputs
    `switch_outputs(0)`) as in `append_quantizers`.
    """
    lead = [f"d{i}" for i in range(rank - 1)]
    x = helper.make_tensor_value_info("x", input_dtype, lead + [hidden])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["tap"])], "quantize", [x],
                              [helper.make_tensor_value_info("tap", input_dtype, lead + [hidden])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    append_quantizers(model, [{"output": "tap", "fmt": fmt, "block_size": block_size, "hidden": hidden,
                               "codes": "codes", "scales": "scales", "tap": 0}], op=op, rows=rows, switch=switch)
    onnx.checker.check_model(model)
    return model
