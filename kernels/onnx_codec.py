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


def quantize_subgraph(x: str, fmt: str, block_size: int, hidden: int, prefix: str) -> Subgraph:
    """Nodes that turn tap `x` [..., hidden] (fp32/fp16) into `codes` (uint8) and `scales` (fp16).

    For `fp16` the codes output is the tap cast to float16 and scales is empty [..., 0].
    """
    fmt = codec.check_format(fmt)
    b = _Builder(prefix)
    lead = b.op("Shape", [x], "lead_shape", end=-1)
    xf = b.op("Cast", [x], "x_f32", to=TensorProto.FLOAT)
    if fmt == "fp16":
        sat = b.op("Clip", [xf, b.const(-codec.FP16_MAX), b.const(codec.FP16_MAX)], "saturated")
        b.sub.codes = b.op("Cast", [sat], "codes", to=TensorProto.FLOAT16)
        empty_shape = b.op("Concat", [lead, b.const([0], np.int64)], "empty_shape", axis=0)
        b.sub.scales = b.op("ConstantOfShape", [empty_shape], "scales",
                            value=helper.make_tensor("v", TensorProto.FLOAT16, [1], [0]))
        return b.sub

    nb = codec.n_blocks(hidden, block_size)
    pad = nb * block_size - hidden
    qmax = codec.QMAX[fmt]
    x2 = b.op("Reshape", [xf, b.const([-1, hidden], np.int64)], "rows")
    if pad:
        x2 = b.op("Pad", [x2, b.const([0, pad], np.int64), b.const(0.0), b.const([-1], np.int64)], "padded")
    xb = b.op("Reshape", [x2, b.const([-1, nb, block_size], np.int64)], "blocks")
    axis = b.const([-1], np.int64, "axis")

    # Steps 1-2: fp16 scale of each block; NaN where the block holds a non-finite value.
    absmax = b.op("ReduceMax", [b.op("Abs", [xb]), axis], "absmax", keepdims=1)
    scale32 = b.op("Min", [b.op("Div", [absmax, b.const(qmax)]), b.const(codec.FP16_MAX)], "scale32")
    scale16 = b.op("Cast", [scale32], "scale16", to=TensorProto.FLOAT16)
    nonfinite = b.op("IsNaN", [b.op("Sub", [xb, xb])], "nonfinite")  # NaN exactly where x is NaN/Inf
    any_bad = b.op("ReduceMax", [b.op("Cast", [nonfinite], to=TensorProto.FLOAT), axis], "any_bad", keepdims=1)
    bad = b.op("Cast", [any_bad], "bad", to=TensorProto.BOOL)
    scales_blocks = b.op("Where", [bad, b.const(np.nan, np.float16), scale16], "scales_nan")
    scales_shape = b.op("Concat", [lead, b.const([nb], np.int64)], "scales_shape", axis=0)
    b.sub.scales = b.op("Reshape", [scales_blocks, scales_shape], "scales")

    # Step 3: y = x / scale (0 where scale == 0), clamped to [-qmax, qmax].
    sf = b.op("Cast", [scale16], "scale_f32", to=TensorProto.FLOAT)
    is_zero = b.op("Equal", [sf, b.const(0.0)], "scale_is_zero")
    safe = b.op("Where", [is_zero, b.const(1.0), sf], "safe_scale")
    y = b.op("Where", [is_zero, b.const(0.0), b.op("Div", [xb, safe])], "y")
    y = b.op("Clip", [y, b.const(-qmax), b.const(qmax)], "y_clamped")
    # NaN elements (their block's scale is already NaN) become 0 so no code or index goes wild.
    y = b.op("Where", [b.op("IsNaN", [y]), b.const(0.0), y], "y_finite")
    y = b.op("Reshape", [y, b.const([-1, nb * block_size], np.int64)], "y_rows")
    if pad:
        y = b.op("Slice", [y, b.const([0], np.int64), b.const([hidden], np.int64), axis], "y_trim")

    # Step 4: codes as exact small floats, packed, then cast to uint8 once.
    codes = {"int8": _int8_codes, "int4": _int4_codes, "nf4": _nf4_codes, "fp8": _fp8_codes}[fmt](b, y)
    if codec.BITS[fmt] == 4:
        codes = _pack_nibbles(b, codes, hidden)
    codes_u8 = b.op("Cast", [codes], "codes_u8", to=TensorProto.UINT8)
    codes_shape = b.op("Concat", [lead, b.const([codec.code_bytes(fmt, hidden)], np.int64)], "codes_shape", axis=0)
    b.sub.codes = b.op("Reshape", [codes_u8, codes_shape], "codes")
    return b.sub


def _int8_codes(b: _Builder, y: str) -> str:
    r = b.op("Round", [y])  # round half to even, as np.rint
    return b.op("Where", [b.op("Less", [r, b.const(0.0)]), b.op("Add", [r, b.const(256.0)]), r], "int8_twos")


def _int4_codes(b: _Builder, y: str) -> str:
    return b.op("Add", [b.op("Round", [y]), b.const(8.0)], "int4_nibble")


def _nf4_codes(b: _Builder, y: str) -> str:
    # Branchless binary search: code = number of thresholds strictly below y.
    thresholds = b.const(np.append(codec.NF4_THRESHOLDS, np.float32(np.inf)), hint="nf4_thresholds")
    lo = None
    for step in (8, 4, 2, 1):
        idx = b.const(step - 1, np.int64) if lo is None else b.op("Add", [lo, b.const(step - 1, np.int64)])
        above = b.op("Greater", [y, b.op("Gather", [thresholds, idx], axis=0)])
        inc = b.op("Mul", [b.op("Cast", [above], to=TensorProto.INT64), b.const(step, np.int64)])
        lo = inc if lo is None else b.op("Add", [lo, inc])
    return b.op("Cast", [lo], "nf4_code", to=TensorProto.FLOAT)


def _fp8_codes(b: _Builder, y: str) -> str:
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
    sign = b.op("Where", [negative, b.const(128.0), b.const(0.0)])
    return b.op("Add", [bits, sign], "fp8_bits")


def _pack_nibbles(b: _Builder, codes: str, hidden: int) -> str:
    if hidden % 2:
        codes = b.op("Pad", [codes, b.const([0, 1], np.int64), b.const(0.0), b.const([-1], np.int64)], "pad_odd")
    pairs = b.op("Reshape", [codes, b.const([-1, (hidden + 1) // 2, 2], np.int64)], "pairs")
    weighted = b.op("Mul", [pairs, b.const([1.0, 16.0])])
    return b.op("ReduceSum", [weighted, b.const([-1], np.int64)], "packed", keepdims=0)


def append_quantizers(model: onnx.ModelProto, taps: list[dict], op: str = "onnx") -> onnx.ModelProto:
    """Replace each tap output of `model` by its quantized pair (codes, scales), in place.

    `taps` items: {"output": graph output name, "fmt", "block_size", "hidden",
    "codes": new output name, "scales": new output name}.
    `op="onnx"` (default) inserts the standard-op subgraph, which any ONNX Runtime runs;
    `op="custom"` inserts one fused com.mobillm node per tap (`custom_quantize_node`), which
    needs the native library registered with the session (`mobillm.kernels.native.register`).
    Both produce the same bytes.
    """
    if op not in QUANT_OPS:
        raise ValueError(f"unknown quantizer op {op!r}; choose one of {', '.join(QUANT_OPS)}")
    graph = model.graph
    by_name = {o.name: o for o in graph.output}
    for tap in taps:
        out = by_name[tap["output"]]
        if op == "custom":
            graph.node.append(custom_quantize_node(tap["output"], tap["fmt"], tap["block_size"],
                                                   tap["codes"], tap["scales"]))
        else:
            sub = quantize_subgraph(tap["output"], tap["fmt"], tap["block_size"], tap["hidden"], prefix=tap["codes"])
            graph.node.extend(sub.nodes)
            graph.initializer.extend(sub.initializers)
            graph.node.extend([
                helper.make_node("Identity", [sub.codes], [tap["codes"]], name=tap["codes"] + "/out"),
                helper.make_node("Identity", [sub.scales], [tap["scales"]], name=tap["scales"] + "/out"),
            ])
        lead = _leading_dims(out)
        fmt = codec.check_format(tap["fmt"])
        codes_type = TensorProto.FLOAT16 if fmt == "fp16" else TensorProto.UINT8
        width = tap["hidden"] if fmt == "fp16" else codec.code_bytes(fmt, tap["hidden"])
        nb = 0 if fmt == "fp16" else codec.n_blocks(tap["hidden"], tap["block_size"])
        graph.output.remove(out)
        graph.output.extend([
            helper.make_tensor_value_info(tap["codes"], codes_type, lead + [width]),
            helper.make_tensor_value_info(tap["scales"], TensorProto.FLOAT16, lead + [nb]),
        ])
    if op == "custom" and taps and not any(o.domain == CUSTOM_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(CUSTOM_DOMAIN, CUSTOM_OPSET))
    return model


def fuse_quantizers(model: onnx.ModelProto, taps: list[dict]) -> onnx.ModelProto:
    """Replace each tap's standard-op quantizer in a finished graph by one com.mobillm node, in place.

    The graph may have been rewritten since `append_quantizers` (weights quantized by ORT, rows
    gathered before the quantizer): the subgraph is found by its node names (prefix
    `tap["codes"]`/...), and its one non-constant input is what the fused node quantizes. Weights
    are untouched, so the result can share the standard graph's external-data file.
    """
    graph = model.graph
    initializers = {i.name for i in graph.initializer}
    fused, all_prefixes = [], ()
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
                     input_dtype: int = TensorProto.FLOAT, op: str = "onnx") -> onnx.ModelProto:
    """A model holding only the quantize subgraph: input `x` [..., hidden] -> `codes`, `scales`.

    `op` as in `append_quantizers`.
    """
    lead = [f"d{i}" for i in range(rank - 1)]
    x = helper.make_tensor_value_info("x", input_dtype, lead + [hidden])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["tap"])], "quantize", [x],
                              [helper.make_tensor_value_info("tap", input_dtype, lead + [hidden])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    append_quantizers(model, [{"output": "tap", "fmt": fmt, "block_size": block_size, "hidden": hidden,
                               "codes": "codes", "scales": "scales"}], op=op)
    onnx.checker.check_model(model)
    return model
