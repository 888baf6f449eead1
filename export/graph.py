"""The ONNX side of an export: trace the tapped decoder, then edit the graph.

`trace_to_onnx` exports `TappedDecoder` (outputs hidden_{layer}); `tap_specs` names the codec
outputs that `kernels/onnx_codec` splices in (the only place the quantization math lives);
`io_specs` describes the graph for the manifest. The rest is graph surgery for the weight
formats (export/weights.py): Gemm -> MatMul, external data streamed tensor by tensor, saving
with weights beside the graph once it passes protobuf's 2 GiB limit.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import sys
import warnings
from pathlib import Path

import numpy as np

from mobillm.kernels import onnx_codec

GRAPH_NAME = "backbone.onnx"
EXTERNAL_DATA_NAME = "backbone.onnx.data"
# Protobuf caps a single file at 2 GiB; stay clear of it and move weights to backbone.onnx.data.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


def choose_exporter(model, exporter: str) -> str:
    """'torchscript' (fast, ~4x the weights in peak memory) unless the weights pass 2 GB, then 'dynamo'
    (slower, streams weights to backbone.onnx.data: opt-1.3b fits a 24 GB machine)."""
    if exporter != "auto":
        return exporter
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return "dynamo" if weight_bytes > EXTERNAL_DATA_THRESHOLD else "torchscript"


def trace_to_onnx(model, family, layers: list[int], dtype: str, path: Path, exporter: str,
                  progress: bool = False, tap_norm: str = "none", summary_row: bool = False,
                  stats=None) -> list[int]:
    """Export TappedDecoder to `path` (outputs hidden_{layer}, dims batch/seq, seq + 1 with a
    summary row); return each tap's width. `stats`: the "channel" taps' TapStats."""
    import torch

    from .tapped import TappedDecoder

    torch_dtype = torch.float16 if dtype == "fp16" else torch.float32
    wrapper = TappedDecoder(model, family, layers, torch_dtype, tap_norm, summary_row, stats).eval()
    ids = torch.tensor([[2, 100, 200, 300, 400, 500], [2, 600, 700, 800, 1, 1]], dtype=torch.long)
    ids = ids.clamp(max=model.config.vocab_size - 1)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], dtype=torch.long)
    with torch.no_grad():
        widths = [int(h.shape[-1]) for h in wrapper(ids, mask)]
    names = [f"hidden_{layer}" for layer in layers]
    inputs = ["input_ids", "attention_mask"]
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about Python branches in HF code we bypass
        if exporter == "torchscript":
            axes = {n: {0: "batch", 1: "seq"} for n in inputs}
            axes.update({n: {0: "batch", 1: "seq_taps" if summary_row else "seq"} for n in names})
            torch.onnx.export(wrapper, (ids, mask), str(path), input_names=inputs, output_names=names,
                              dynamic_axes=axes, opset_version=onnx_codec.OPSET, do_constant_folding=True,
                              dynamo=False)
        else:
            batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
            shapes = {n: {0: batch, 1: seq} for n in inputs}
            # The dynamo exporter reports its own steps on stdout; stdout is for the summary.
            with contextlib.redirect_stdout(sys.stderr if progress else io.StringIO()), quiet_loggers("torch.onnx"):
                program = torch.onnx.export(wrapper, (ids, mask), input_names=inputs, output_names=names,
                                            dynamic_shapes=shapes, opset_version=onnx_codec.OPSET, dynamo=True,
                                            optimize=True, verbose=False)
                program.save(str(path), external_data=True)
            del program
    return widths


ROW_INPUT = "tap_rows"  # the graph input of the rows to quantize (export --tap-rows, the default)


def tap_specs(layers, widths, formats, block_size) -> list[dict]:
    """What `onnx_codec.append_quantizers` needs per tap: the traced output and the codec outputs' names."""
    return [{"output": f"hidden_{layer}", "fmt": fmt, "block_size": block_size, "hidden": width,
             "codes": f"tap{i}_codes", "scales": f"tap{i}_scales", "tap": i}
            for i, (layer, width, fmt) in enumerate(zip(layers, widths, formats))]


SWITCH_INPUT = "tap_formats"  # the graph input of each tap's format (export --tap-formats)


def tap_switch(formats: list[str], n_taps: int) -> dict:
    """Manifest `tap_switch` of an engine exported with --tap-formats `formats`."""
    return {"input": SWITCH_INPUT, "formats": list(formats),
            "outputs": [onnx_codec.switch_outputs(i) for i in range(n_taps)]}


def initializer_bytes(model) -> int:
    """Bytes of all initializers, without serializing (ByteSize fails past 2 GiB)."""
    return sum(initializer_bytes_of(init) for init in model.graph.initializer)


def initializer_bytes_of(tensor) -> int:
    """Bytes of one initializer's values, loaded or not."""
    n = int(np.prod(tensor.dims)) if len(tensor.dims) else 1
    return n * _ELEM_SIZE.get(tensor.data_type, 4)


_ELEM_SIZE = {1: 4, 2: 1, 3: 1, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 16: 2, 21: 1, 22: 1}


def save_onnx(model, path: Path) -> str | None:
    """Save the graph; weights go to backbone.onnx.data when the file would pass 2 GiB."""
    import onnx

    external = initializer_bytes(model) > EXTERNAL_DATA_THRESHOLD
    location = path.name + ".data"
    onnx.save_model(model, str(path), save_as_external_data=external, all_tensors_to_one_file=True,
                    location=location, size_threshold=1024)
    return location if external else None


def move_weights_out(folder: Path) -> str:
    """Move the weights still held inside `folder`'s graph file into EXTERNAL_DATA_NAME beside it.

    Every engine keeps its weights there, whatever their size: ONNX Runtime maps an external-data
    file into memory instead of parsing the weights out of the protobuf, so loading adds no second
    copy (Gemma 3 270M int8: peak RSS at load 641 -> 412 MiB) and a row of the embedding table is
    paged in only when a token uses it (docs/benchmarks.md, "Device memory: what loading costs")."""
    import onnx

    if not (folder / EXTERNAL_DATA_NAME).exists():
        model = onnx.load(str(folder / GRAPH_NAME), load_external_data=False)
        onnx.save_model(model, str(folder / GRAPH_NAME), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=EXTERNAL_DATA_NAME, size_threshold=1024)
    return EXTERNAL_DATA_NAME


def codec_node_names(model) -> list[str]:
    """Nodes spliced in by onnx_codec (named 'tap{i}_codes/...'): weight quantization leaves them alone."""
    return [n.name for n in model.graph.node if re.match(r"^tap\d+_(codes|scales|sel)", n.name)]


def gemm_to_matmul(model, weights_dir: Path | None = None) -> set[str]:
    """Rewrite Gemm(x, W^T, b) with constant W as MatMul(x, W') + b: ORT's weight quantizers only see MatMul.

    With `weights_dir` None the weights are in memory and are transposed in place, one tensor at a
    time. Otherwise they are still on disk (external data under `weights_dir`): the graph is only
    rewired, and `copy_external_data` transposes the returned weights while it copies them.
    A Gemm whose weight is shared with another node stays a Gemm (its weight stays fp32).
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    uses = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    nodes, transposed = [], set()
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        weight = node.input[1] if len(node.input) > 1 else None
        if (node.op_type != "Gemm" or weight not in inits or uses[weight] > 1 or attrs.get("transA", 0)
                or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0):
            nodes.append(node)
            continue
        if attrs.get("transB", 0):
            transposed.add(weight)
            if weights_dir is None:
                replace_data(inits[weight], numpy_helper.to_array(inits[weight]).T)
        if len(node.input) > 2 and node.input[2]:
            mm = node.output[0] + "/matmul"
            nodes.append(helper.make_node("MatMul", [node.input[0], weight], [mm], name=node.name + "/MatMul"))
            nodes.append(helper.make_node("Add", [mm, node.input[2]], [node.output[0]], name=node.name + "/Add"))
        else:
            nodes.append(helper.make_node("MatMul", [node.input[0], weight], [node.output[0]], name=node.name))
    del graph.node[:]
    graph.node.extend(nodes)
    # The dynamo exporter annotates initializer shapes; the transposed ones are now stale.
    stale = [vi for vi in graph.value_info if vi.name in transposed]
    for vi in stale:
        graph.value_info.remove(vi)
    return transposed


def copy_external_data(model, src_dir: Path, dst_dir: Path, transpose: set[str] = frozenset()) -> None:
    """Copy a graph's external weights into dst_dir/backbone.onnx.data one tensor at a time
    (transposing the named 2-D ones), pointing the graph at the new file. Memory: one tensor."""
    from onnx import helper
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    with open(dst_dir / EXTERNAL_DATA_NAME, "wb") as out:
        for init in model.graph.initializer:
            if not uses_external_data(init):
                continue
            info = ExternalDataInfo(init)
            src = src_dir / info.location
            offset = info.offset or 0
            length = info.length if info.length is not None else src.stat().st_size - offset
            data = np.fromfile(src, dtype=np.uint8, count=length, offset=offset)
            if init.name in transpose:
                values = data.view(helper.tensor_dtype_to_np_dtype(init.data_type)).reshape(tuple(init.dims))
                data = np.ascontiguousarray(values.T)
                del init.dims[:]
                init.dims.extend(data.shape)
            out.write(b"\0" * (-out.tell() % 4096))  # page-aligned tensors can be memory-mapped
            start = out.tell()
            data.tofile(out)
            del init.external_data[:]
            for key, value in (("location", EXTERNAL_DATA_NAME), ("offset", start), ("length", data.nbytes)):
                entry = init.external_data.add()
                entry.key, entry.value = key, str(value)


def stored_externally(tensor) -> bool:
    """Whether an initializer's values live in an external-data file rather than the graph."""
    from onnx import TensorProto

    return tensor.HasField("data_location") and tensor.data_location == TensorProto.EXTERNAL


def replace_data(tensor, array: np.ndarray) -> None:
    """Overwrite an initializer's values, shape and dtype in place."""
    from onnx import helper

    array = np.ascontiguousarray(array)
    for field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
        tensor.ClearField(field)
    tensor.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
    del tensor.dims[:]
    tensor.dims.extend(array.shape)
    tensor.raw_data = array.tobytes()


@contextlib.contextmanager
def quiet_loggers(*logger_names: str):
    """Raise the named loggers to ERROR for the block (exporters and quantizers chat per node)."""
    loggers = [logging.getLogger(name) for name in logger_names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def io_specs(model) -> tuple[list[dict], list[dict]]:
    """Names, dtypes and shapes (dim names for dynamic axes) of the graph's inputs and outputs."""
    from onnx import helper

    def spec(vi):
        t = vi.type.tensor_type
        dims = [d.dim_param or int(d.dim_value) for d in t.shape.dim]
        return {"name": vi.name, "dtype": str(helper.tensor_dtype_to_np_dtype(t.elem_type)), "shape": dims}

    return [spec(i) for i in model.graph.input], [spec(o) for o in model.graph.output]


def consolidate(folder: Path) -> str | None:
    """Rewrite a graph whose weights a quantizer spread over several files into graph + one .data file."""
    import onnx

    graph = onnx.load(str(folder / GRAPH_NAME))
    for p in folder.iterdir():
        if p.is_file():
            p.unlink()
    return save_onnx(graph, folder / GRAPH_NAME)

