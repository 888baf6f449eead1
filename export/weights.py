"""Weight storage formats of the engine graph: fp32 as traced, fp16, and ORT weight-only int8 / int4.

The codec nodes (named tap{i}_codes/..., see export/graph.py) are never touched, so the taps
stay bit-exact with kernels/codec.py whatever the weights. Each writer leaves the graph as
`backbone.onnx` in the engine folder and returns the
external-data file name or None. The pipeline calls them in one stage (`pipeline._write_graph`),
which owns the in-memory graph so it can drop it before ORT's quantizer loads its own copy.
"""

from __future__ import annotations

import contextlib
import shutil
import warnings
from pathlib import Path

import numpy as np

from mobillm.kernels import onnx_codec

from . import graph as graph_ops
from .graph import EXTERNAL_DATA_NAME, GRAPH_NAME

# int8: one weight scale per output channel (per tensor loses 3.5 % RMS on Gemma 3's MatMul weights, per channel
# 0.9 %; docs/export.md).
INT8_PER_CHANNEL = True
INT4_BLOCK_SIZE = 32  # MatMulNBits block along the input dimension
INT8_BLOCK_SIZE = 32  # --int8-kernel blocks: MatMulNBits / GatherBlockQuantized, 8 bits
# MatMulNBits compute (int8 blocks and int4): 0 = fp32 on the dequantized weights. ORT 1.32's CPU kernel takes
# level 4's int8 path (activations int8 per block) only on pre-packed weights, which edge-run turns off and a
# bundle's runtime leaves on: level 4 made an engine's numbers depend on that session option (6-7 % of the tap
# codes moved; tests/export/test_int8_kernels.py), for 1.1 x the speed on Gemma (docs/benchmarks.md).
NBITS_ACCURACY_LEVEL = 0
QUANTIZED = ("int8", "int4")


def streamed_as_exported(model, raw: Path, dtype: str, weights: str) -> bool:
    """Large, stored as traced, and already in the one weights file the dynamo exporter streamed out."""
    return (weights == dtype and graph_ops.initializer_bytes(model) > graph_ops.EXTERNAL_DATA_THRESHOLD
            and sorted(p.name for p in raw.iterdir()) == [GRAPH_NAME, EXTERNAL_DATA_NAME])


def keep_streamed(model, raw: Path, folder: Path) -> str:
    """Keep the weights file the exporter wrote: the weights are never loaded into memory."""
    import onnx

    onnx.save_model(model, str(folder / GRAPH_NAME))
    (raw / EXTERNAL_DATA_NAME).rename(folder / EXTERNAL_DATA_NAME)
    return EXTERNAL_DATA_NAME


def write_float(model, raw: Path, folder: Path, dtype: str, weights: str) -> str | None:
    """Load the weights into the graph, store them as fp16 when asked (compute stays `dtype`), save."""
    from onnx.external_data_helper import load_external_data_for_model

    load_external_data_for_model(model, str(raw))
    shutil.rmtree(raw)
    if weights == "fp16" and dtype == "fp32":
        weights_to_fp16(model)
    return graph_ops.save_onnx(model, folder / GRAPH_NAME)


def write_gguf(model, raw: Path, folder: Path, gguf_file: Path, widen: bool, progress: bool) -> tuple[dict, str | None]:
    """--weights gguf: the traced fp32 graph with its GGUF tensors replaced by the GGUF's own codes
    (export/gguf_weights.py); (weight_quant record, external-data name)."""
    from onnx.external_data_helper import load_external_data_for_model

    from . import gguf_weights

    load_external_data_for_model(model, str(raw))
    shutil.rmtree(raw)
    graph_ops.gemm_to_matmul(model)
    record = gguf_weights.apply(model, gguf_file, widen=widen, progress=progress)
    return record, graph_ops.save_onnx(model, folder / GRAPH_NAME)


def stage_for_quantization(model, raw: Path, stage: Path) -> None:
    """Write the graph with its Gemms rewritten as MatMuls into `stage`, the quantizer's input.

    Weights still on disk are rewired and streamed (never all in memory); in-memory ones are
    transposed in place."""
    import onnx

    stage.mkdir()
    if any(graph_ops.stored_externally(i) for i in model.graph.initializer):
        graph_ops.copy_external_data(model, raw, stage, transpose=graph_ops.gemm_to_matmul(model, weights_dir=raw))
        onnx.save_model(model, str(stage / GRAPH_NAME))
    else:
        graph_ops.gemm_to_matmul(model)
        graph_ops.save_onnx(model, stage / GRAPH_NAME)


def quantize_staged(stage: Path, folder: Path, weights: str, exclude: list[str],
                    int8_kernel: str = "blocks") -> tuple[dict, str | None]:
    """(settings for the manifest's weight_quant, external-data name) after quantizing the staged graph."""
    release_freed_memory()  # the traced model and the exporter's buffers: ORT's quantizer needs ~3x the weights
    weight_quant = quantize_weights(stage / GRAPH_NAME, folder / GRAPH_NAME, weights, exclude, int8_kernel)
    shutil.rmtree(stage)
    external = EXTERNAL_DATA_NAME if (folder / EXTERNAL_DATA_NAME).exists() else None
    if any(p.name not in (GRAPH_NAME, EXTERNAL_DATA_NAME) for p in folder.iterdir()):
        external = graph_ops.consolidate(folder)
    return weight_quant, external


def weights_to_fp16(model) -> None:
    """Store large fp32 weights as fp16 (compute stays fp32, file halves), converted in place
    (renamed `NAME/fp16`), so the graph is never held twice.

    A weight read only as a Gather's table (the embedding) stays fp16 in memory too: the Gather
    reads fp16 rows and a Cast after it widens just those rows. Any other weight gets a Cast back
    to fp32 in front of its users, which ONNX Runtime folds at load time (file smaller, memory not).
    """
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    codec_inits = {i for n in graph.node if n.name.startswith("tap") for i in n.input}
    users: dict[str, list] = {}
    for node in graph.node:
        for k, name in enumerate(node.input):
            users.setdefault(name, []).append((node, k))
    front, after = [], {}  # Casts of weights (graph start); Casts of Gather outputs (right after the Gather)
    for init in graph.initializer:
        if init.data_type != TensorProto.FLOAT or int(np.prod(init.dims)) < 1024 or init.name in codec_inits:
            continue
        name = init.name
        graph_ops.replace_data(init, numpy_helper.to_array(init).astype(np.float16))
        init.name = name + "/fp16"
        uses = users.get(name, [])
        if uses and all(node.op_type == "Gather" and k == 0 for node, k in uses):
            for node, _ in uses:
                out = node.output[0]
                node.input[0], node.output[0] = init.name, out + "/fp16"
                after[node.output[0]] = helper.make_node("Cast", [node.output[0]], [out], name=node.name + "/to_fp32",
                                                         to=TensorProto.FLOAT)
        else:
            front.append(helper.make_node("Cast", [init.name], [name], name=name + "/to_fp32", to=TensorProto.FLOAT))
    nodes = list(front)
    for node in graph.node:
        nodes.append(node)
        if node.output and node.output[0] in after:
            nodes.append(after[node.output[0]])
    del graph.node[:]
    graph.node.extend(nodes)


def quantize_weights(src: Path, dst: Path, weights: str, exclude: list[str], int8_kernel: str = "blocks") -> dict:
    """ORT weight-only quantization of MatMul weights and the embedding Gathers.

    int8, kernel "blocks": `MatMulNBitsQuantizer` at 8 bits (MatMulNBits, symmetric blocks of INT8_BLOCK_SIZE
    inputs, fp32 compute: NBITS_ACCURACY_LEVEL), the embedding as
    GatherBlockQuantized 8-bit blocks (ORT's quantizer does Gather at 4 bits only: `quantize_tables`);
    int8, kernel "dynamic": `quantize_dynamic` (int8 weights, one scale per output channel; activations
    quantized per call and per tensor by DynamicQuantizeLinear);
    int4: `MatMulNBitsQuantizer` (MatMulNBits / GatherBlockQuantized, blocks of INT4_BLOCK_SIZE).
    The codec nodes are excluded, so the taps stay bit-exact with kernels/codec.py.
    """
    import onnx

    op_types = ["MatMul", "Gather"]
    with _quiet_ort_quantization():
        if weights == "int8" and int8_kernel == "dynamic":
            chunks = quantize_dynamic_in_chunks(src, dst, op_types, exclude)
            return {"tool": "onnxruntime.quantization.quantize_dynamic", "kernel": "dynamic", "weight_type": "QInt8",
                    "op_types": op_types, "per_channel": INT8_PER_CHANNEL, "chunks": chunks}
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        bits, block = (8, INT8_BLOCK_SIZE) if weights == "int8" else (4, INT4_BLOCK_SIZE)
        quantizer = MatMulNBitsQuantizer(onnx.load(str(src)), bits=bits, block_size=block, is_symmetric=True,
                                         accuracy_level=NBITS_ACCURACY_LEVEL, nodes_to_exclude=exclude,
                                         op_types_to_quantize=tuple(op_types if bits == 4 else ["MatMul"]))
        quantizer.process()
        model = quantizer.model.model
        tables = quantize_tables(model, bits, block, exclude) if bits == 8 else None
        graph_ops.save_onnx(model, dst)
    record = {"tool": "onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer", "bits": bits,
              "block_size": block, "is_symmetric": True, "op_types": op_types, "accuracy_level": NBITS_ACCURACY_LEVEL}
    if bits == 8:
        record.update(kernel="blocks", tables=tables)
    return record


def quantize_tables(model, bits: int, block: int, exclude: list[str]) -> dict:
    """Embedding tables (initializers read only as a Gather's axis-0 table) as GatherBlockQuantized blocks of
    `block` values along the hidden dimension, symmetric absmax; a table whose width `block` does not divide
    stays fp32. In place; returns {"quantized": [...], "kept_fp32": [...]} for the manifest."""
    from onnx import numpy_helper

    from .gguf_weights import Blocks, block_initializers, block_node, swap_in, weight_users

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    skip = set(exclude)
    replace, removed, new_inits = {}, set(), []
    record: dict[str, list] = {"quantized": [], "kept_fp32": []}
    for name, (kind, users) in weight_users(graph, inits).items():
        init = inits[name]
        if kind != "gather" or int(np.prod(init.dims)) < 4096 or any(n.name in skip for n in users):
            continue
        if init.dims[1] % block:
            record["kept_fp32"].append(name)
            continue
        blocks = Blocks.symmetric(numpy_helper.to_array(init).astype(np.float32), bits, block)
        base = f"int{bits}/{name}"
        new_inits += block_initializers(blocks, base, kind)
        for node in users:
            replace[node.output[0]] = block_node(node, blocks, base, kind)
        removed.add(name)
        record["quantized"].append(name)
    if replace:
        swap_in(model, replace, removed, new_inits)
    return record


CHUNK_BYTES = 512 * 2**20  # fp32 weights per quantize_dynamic call; its peak is ~3x what it is given


def quantize_dynamic_in_chunks(src: Path, dst: Path, op_types: list[str], exclude: list[str],
                               chunk_bytes: int = CHUNK_BYTES) -> int:
    """ORT's `quantize_dynamic` (QInt8 weights, per-tensor), run on sub-graphs of at most `chunk_bytes`
    of weights and spliced back; returns the number of calls.

    `quantize_dynamic` deep-copies and reloads the whole model for shape inference, so it peaks at
    about 3x the fp32 weights: 15 GB for opt-1.3b. Each sub-graph holds only some weighted nodes
    (the MatMuls reading one activation stay together, so they share one DynamicQuantizeLinear),
    their weights and their activation inputs; the graph itself stays on disk until the end.
    """
    import onnx
    from onnx import TensorProto, helper
    from onnx.external_data_helper import load_external_data_for_model, load_external_data_for_tensor
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.onnx_model import ONNXModel

    model = onnx.load(str(src), load_external_data=False)
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    groups: dict[str, list] = {}  # activation input -> weighted nodes reading it
    for node in graph.node:
        weight = node.input[0] if node.op_type == "Gather" else (node.input[1] if len(node.input) > 1 else None)
        if (node.op_type in op_types and node.name not in exclude and weight in inits
                and inits[weight].data_type == TensorProto.FLOAT):
            groups.setdefault(node.input[1] if node.op_type == "Gather" else node.input[0], []).append(node)
    chunks, size = [[]], 0
    for nodes in groups.values():
        nbytes = sum(graph_ops.initializer_bytes_of(inits[n.input[0] if n.op_type == "Gather" else n.input[1]])
                     for n in nodes)
        if chunks[-1] and size + nbytes > chunk_bytes:
            chunks.append([])
            size = 0
        chunks[-1].extend(nodes)
        size += nbytes
    types = {vi.name: vi.type.tensor_type.elem_type for vi in [*graph.input, *graph.value_info]}
    quantized_weights, new_nodes, added, produced = set(), [], set(), set()
    work = dst.parent / "_chunks"
    for k, nodes in enumerate(c for c in chunks if c):
        weights_of = {n.input[0] if n.op_type == "Gather" else n.input[1] for n in nodes}
        sub_inits = []
        for name in weights_of:
            tensor = onnx.TensorProto()
            tensor.CopyFrom(inits[name])
            if graph_ops.stored_externally(tensor):
                load_external_data_for_tensor(tensor, str(src.parent))
            sub_inits.append(tensor)
        activations = sorted({i for n in nodes for i in n.input if i and i not in weights_of})
        sub = helper.make_graph(
            list(nodes), f"chunk{k}",
            [helper.make_tensor_value_info(a, types.get(a, TensorProto.FLOAT), None) for a in activations],
            [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for n in nodes for o in n.output],
            initializer=sub_inits)
        sub_model = helper.make_model(sub, opset_imports=list(model.opset_import), ir_version=model.ir_version)
        del sub_inits, sub
        work.mkdir(exist_ok=True)
        onnx.save_model(sub_model, str(work / "in.onnx"), save_as_external_data=True, location="in.onnx.data")
        del sub_model
        quantize_dynamic(str(work / "in.onnx"), str(work / "out.onnx"), weight_type=QuantType.QInt8,
                         op_types_to_quantize=op_types, per_channel=INT8_PER_CHANNEL, use_external_data_format=True,
                         extra_options={"MatMulConstBOnly": True})
        out = onnx.load(str(work / "out.onnx"))
        shutil.rmtree(work)
        # A node another chunk already added (the same activation's quantizer) is kept once.
        new_nodes.extend(n for n in out.graph.node if not set(n.output) <= produced)
        produced.update(o for n in out.graph.node for o in n.output)
        graph.initializer.extend(i for i in out.graph.initializer if i.name not in inits and i.name not in added)
        added.update(i.name for i in out.graph.initializer)
        quantized_weights |= weights_of
        onnx_codec.merge_opsets(model, out)
        release_freed_memory()
    replaced = {id(n) for c in chunks for n in c}
    kept = [n for n in graph.node if id(n) not in replaced]
    del graph.node[:]
    graph.node.extend(kept + new_nodes)
    for name in quantized_weights:
        graph.initializer.remove(inits[name])
    load_external_data_for_model(model, str(src.parent))  # what is left: biases, norms (small)
    ONNXModel(model).topological_sort()
    graph_ops.save_onnx(model, dst)
    return sum(1 for c in chunks if c)


@contextlib.contextmanager
def _quiet_ort_quantization():
    """ORT's quantizers log one line per node at INFO/WARNING; keep the export output readable."""
    with graph_ops.quiet_loggers("", "onnxruntime.quantization.matmul_nbits_quantizer"):
        # All-zero rows (OPT's padding embedding) divide 0 by 0 in the int4 quantizer; their scale is 0.
        with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
            warnings.simplefilter("ignore", RuntimeWarning)
            yield


def release_freed_memory() -> None:
    """Hand memory that Python and torch have freed back to the OS (glibc keeps it otherwise).

    After a dynamo export of opt-1.3b the process still held several GB of freed heap, and
    `quantize_dynamic` then needs about 3x the fp32 weights (it deep-copies the model and
    reloads it for shape inference): together they passed 18 GB. A no-op where libc has no malloc_trim."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
