"""Weight storage formats of the engine graph: fp32 as traced, fp16, and ORT weight-only int8 / int4.

The codec nodes (named tap{i}_codes/..., see export/graph.py) are never touched, so the taps
stay bit-exact with kernels/codec.py whatever the weights. Each writer leaves the graph as
`backbone.onnx` (+ `backbone.onnx.data` past 2 GiB) in the engine folder and returns the
external-data file name or None. The pipeline calls them in one stage (`pipeline._write_graph`),
which owns the in-memory graph so it can drop it before ORT's quantizer loads its own copy.
"""

from __future__ import annotations

import contextlib
import shutil
import warnings
from pathlib import Path

import numpy as np

from . import graph as graph_ops
from .graph import EXTERNAL_DATA_NAME, GRAPH_NAME

INT4_BLOCK_SIZE = 32  # MatMulNBits block along the input dimension
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


def quantize_staged(stage: Path, folder: Path, weights: str, exclude: list[str]) -> tuple[dict, str | None]:
    """(settings for the manifest's weight_quant, external-data name) after quantizing the staged graph."""
    weight_quant = quantize_weights(stage / GRAPH_NAME, folder / GRAPH_NAME, weights, exclude)
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


def quantize_weights(src: Path, dst: Path, weights: str, exclude: list[str]) -> dict:
    """ORT weight-only quantization of MatMul weights and the embedding Gathers.

    int8: `quantize_dynamic` (int8 weights, activations quantized per call by DynamicQuantizeLinear);
    int4: `MatMulNBitsQuantizer` (MatMulNBits / GatherBlockQuantized, blocks of INT4_BLOCK_SIZE).
    The codec nodes are excluded, so the taps stay bit-exact with kernels/codec.py.
    """
    import onnx

    op_types = ["MatMul", "Gather"]
    with _quiet_ort_quantization():
        if weights == "int8":
            from onnxruntime.quantization import QuantType, quantize_dynamic

            large = _size_of(src) > graph_ops.EXTERNAL_DATA_THRESHOLD
            quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=op_types,
                             nodes_to_exclude=exclude, per_channel=False, use_external_data_format=large,
                             extra_options={"MatMulConstBOnly": True})
            return {"tool": "onnxruntime.quantization.quantize_dynamic", "weight_type": "QInt8",
                    "op_types": op_types, "per_channel": False}
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        quantizer = MatMulNBitsQuantizer(onnx.load(str(src)), bits=4, block_size=INT4_BLOCK_SIZE, is_symmetric=True,
                                         nodes_to_exclude=exclude, op_types_to_quantize=tuple(op_types))
        quantizer.process()
        graph_ops.save_onnx(quantizer.model.model, dst)
    return {"tool": "onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer", "bits": 4,
            "block_size": INT4_BLOCK_SIZE, "is_symmetric": True, "op_types": op_types}



@contextlib.contextmanager
def _quiet_ort_quantization():
    """ORT's quantizers log one line per node at INFO/WARNING; keep the export output readable."""
    with graph_ops.quiet_loggers("", "onnxruntime.quantization.matmul_nbits_quantizer"):
        # All-zero rows (OPT's padding embedding) divide 0 by 0 in the int4 quantizer; their scale is 0.
        with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
            warnings.simplefilter("ignore", RuntimeWarning)
            yield


def _size_of(path: Path) -> int:
    """Bytes of a graph file and the files beside it (its external data)."""
    return sum(p.stat().st_size for p in path.parent.iterdir() if p.is_file())
