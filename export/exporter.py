"""`export_engine`: a decoder checkpoint -> an engine folder the device runs without torch.

    ENGINE/backbone.onnx (+ backbone.onnx.data over 2 GB)   input_ids, attention_mask -> tap{i}_codes, tap{i}_scales
    ENGINE/tokenizer/                                        tokenizer.json (+ the source files)
    ENGINE/manifest.json                                     everything downstream needs, with sha256 of each file

Stages, in order: check every option (cheap, before any model is built) -> build the torch model
-> trace `TappedDecoder` to ONNX -> splice the codec of each tap into the graph
(`kernels/onnx_codec`, the only place the quantization math lives) -> optional ORT weight-only
quantization -> tokenizer -> manifest -> optional verify -> rename the temp folder into place.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from mobillm.kernels import codec, onnx_codec

from . import families
from . import gguf as gguf_source
from mobillm.common.manifest import Manifest

GRAPH_NAME = "backbone.onnx"
EXTERNAL_DATA_NAME = "backbone.onnx.data"
TOKENIZER_DIR = "tokenizer"
COMPUTE_DTYPES = ("fp32", "fp16")
WEIGHT_FORMATS = ("fp32", "fp16", "int8", "int4")
EXPORTERS = ("auto", "torchscript", "dynamo")
INT4_BLOCK_SIZE = 32  # MatMulNBits block along the input dimension
# Protobuf caps a single file at 2 GiB; stay clear of it and move weights to backbone.onnx.data.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model", "chat_template.jinja")


class ExportError(ValueError):
    """Bad input: the message says what was wrong and what to do (the CLI exits 2 with it)."""


# ----------------------------------------------------------------------------- options

def default_blocks(num_layers: int) -> list[int]:
    """Block sizes bottom to top: coarse at the bottom, single layers near the top.

    Built from the top down with sizes 1,1,1,1,2,2,4,4,8,8,...; whatever is left at the bottom
    becomes one more block, merged into the block above it when smaller. 12 layers ->
    4,2,2,1,1,1,1; 24 -> 8,4,4,2,2,1,1,1,1; 32 -> 8,8,4,4,2,2,1,1,1,1.
    """
    if num_layers < 1:
        raise ExportError(f"the model has {num_layers} layers; need at least 1")
    top_down: list[int] = []
    left = num_layers
    k = 0
    while left > 0:
        size = 1 if k < 4 else 2 ** ((k - 2) // 2)
        if size >= left:
            if top_down and left < top_down[-1]:
                top_down[-1] += left
            else:
                top_down.append(left)
            break
        top_down.append(size)
        left -= size
        k += 1
    return top_down[::-1]


def taps_from_blocks(blocks: list[int]) -> list[int]:
    """1-based layer index at the top of each block."""
    return [int(x) for x in np.cumsum(blocks)]


def resolve_taps(num_layers: int, blocks=None, taps=None) -> tuple[list[int], list[int]]:
    """(blocks, taps) from --blocks or --taps or the default; the final layer is always tapped."""
    if blocks is not None and taps is not None:
        raise ExportError("give either --blocks or --taps, not both")
    if blocks is not None:
        blocks = [int(b) for b in blocks]
        if not blocks or any(b < 1 for b in blocks):
            raise ExportError(f"--blocks {_csv(blocks)}: every block needs at least 1 layer")
        if sum(blocks) != num_layers:
            raise ExportError(f"--blocks {_csv(blocks)} sums to {sum(blocks)} but the model has {num_layers} "
                              f"layers; make the sizes add up to {num_layers}")
        return blocks, taps_from_blocks(blocks)
    if taps is not None:
        taps = [int(t) for t in taps]
        if not taps:
            raise ExportError("--taps is empty; list 1-based layer indices, e.g. --taps 4,8,12")
        bad = [t for t in taps if not 1 <= t <= num_layers]
        if bad:
            raise ExportError(f"--taps {_csv(bad)} outside 1..{num_layers}; layers are 1-based and the model "
                              f"has {num_layers}")
        if any(b <= a for a, b in zip(taps, taps[1:])):
            raise ExportError(f"--taps {_csv(taps)} must be strictly increasing")
        if taps[-1] != num_layers:
            taps = taps + [num_layers]  # the head reads the final layer
        return [b - a for a, b in zip([0] + taps, taps)], taps
    blocks = default_blocks(num_layers)
    return blocks, taps_from_blocks(blocks)


def resolve_quant(quant, n_taps: int) -> list[str]:
    """One codec format per tap from 'nf4', 'nf4,int8,...' or a list."""
    items = quant.split(",") if isinstance(quant, str) else list(quant)
    items = [str(q).strip() for q in items]
    try:
        formats = [codec.check_format(q) for q in items]
    except ValueError as exc:
        raise ExportError(f"--quant: {exc}") from None
    if len(formats) == 1:
        return formats * n_taps
    if len(formats) != n_taps:
        raise ExportError(f"--quant lists {len(formats)} formats but there are {n_taps} taps; give one format "
                          f"for all or exactly one per tap")
    return formats


def resolve_weights(dtype: str, weights: str | None) -> str:
    if dtype not in COMPUTE_DTYPES:
        raise ExportError(f"--dtype {dtype!r} unknown; choose one of {', '.join(COMPUTE_DTYPES)}")
    weights = dtype if weights is None else weights
    if weights not in WEIGHT_FORMATS:
        raise ExportError(f"--weights {weights!r} unknown; choose one of {', '.join(WEIGHT_FORMATS)}")
    if dtype == "fp16" and weights != "fp16":
        raise ExportError(f"--dtype fp16 needs fp16 weights (got --weights {weights}); drop --weights, or use "
                          f"--dtype fp32 for {weights} weights")
    return weights


def _csv(values) -> str:
    return ",".join(str(v) for v in values)


# ----------------------------------------------------------------------------- model source

@dataclass
class Source:
    """Where the config and weights come from."""

    kind: str  # "hub" | "checkpoint" | "gguf" | "random-init"
    model_id: str  # Hugging Face id or absolute checkpoint folder (gguf: the converted checkpoint's folder)
    config_path: Path | None = None  # random-init: the config file to start from
    gguf: "gguf_source.GGUFSource | None" = None  # gguf: the file the checkpoint is converted from

    @property
    def local_dir(self) -> Path | None:
        path = Path(self.model_id)
        return path if path.is_absolute() and path.is_dir() else None


_HF_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def resolve_source(model: str, random_init: bool) -> Source:
    """Map a short name, GGUF, Hugging Face id or checkpoint folder to a Source; ExportError if none fits.

    A GGUF is only described here (header, architecture, size); `prepare_source` converts it."""
    shorts = families.SHORT_NAMES
    kind = "random-init" if random_init else None
    shipped = resources.files("mobillm.export.configs") / f"{model}.json"
    if random_init and (model in shorts or model in families.GGUF_SHORT_NAMES) and shipped.is_file():
        return Source("random-init", shorts.get(model, model), Path(str(shipped)))
    if model in shorts:
        return Source("hub", shorts[model])
    if gguf_source.is_gguf_name(model):
        if random_init:
            raise ExportError(f"{model}: --random-init takes a short name or a checkpoint folder, not a GGUF file")
        try:
            src = gguf_source.resolve(model)
        except gguf_source.GGUFError as exc:
            raise ExportError(str(exc)) from None
        return Source("gguf", str(gguf_source.checkpoint_dir(src)), gguf=src)
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ExportError(f"{model}: checkpoint folder has no config.json; point at the folder written by "
                              f"save_pretrained()")
        path = path.resolve()
        return Source(kind or "checkpoint", str(path), path / "config.json" if random_init else None)
    if _HF_ID.match(model) and not path.exists():
        return Source(kind or "hub", model)
    names = [*shorts, *families.GGUF_SHORT_NAMES]
    raise ExportError(f"unknown model {model!r}; use one of {', '.join(names)}, a .gguf file, a Hugging Face id "
                      f"(org/name) or a checkpoint folder with config.json")


def prepare_source(source: Source, progress: bool) -> None:
    """Convert a GGUF into its cached checkpoint folder (once; later calls return at once)."""
    if source.gguf is None:
        return
    if progress and source.gguf.licence is not None:
        print(f"{source.gguf.short_name}: licensed under the terms in {source.gguf.licence}", file=sys.stderr)
    try:
        gguf_source.materialize(source.gguf, progress)
    except gguf_source.GGUFError as exc:
        raise ExportError(str(exc)) from None


def load_config(source: Source):
    """The transformers config of `source` (its family must have a table entry)."""
    from transformers import CONFIG_MAPPING, AutoConfig

    try:
        if source.config_path is not None:
            data = json.loads(Path(source.config_path).read_text())
            config = CONFIG_MAPPING[data["model_type"]].from_dict(data)
        else:
            config = AutoConfig.from_pretrained(source.model_id)
    except (OSError, ValueError, KeyError) as exc:
        raise ExportError(f"cannot load the config of {source.model_id} ({_first_line(exc)}); no network here: "
                          f"pass a checkpoint folder, or a short name with --random-init") from None
    try:
        families.family_for(config.model_type)
    except ValueError as exc:
        raise ExportError(str(exc)) from None
    return config


def config_from_dict(data: dict):
    """Rebuild a transformers config from the dict a manifest stores."""
    from transformers import CONFIG_MAPPING

    return CONFIG_MAPPING[data["model_type"]].from_dict(dict(data))


def apply_overrides(config, overrides: dict) -> dict:
    """Set each key=value on config, typed like the current value; return the typed overrides."""
    known = config.to_dict()
    typed = {}
    for key, value in overrides.items():
        if key not in known:
            close = [k for k in known if key.lower() in k.lower() or k.lower() in key.lower()]
            hint = f" (did you mean {', '.join(close[:3])}?)" if close else ""
            raise ExportError(f"--set {key}: no such config field{hint}; see the model's config.json for valid keys")
        typed[key] = _typed_value(key, value, known[key])
        setattr(config, key, typed[key])
    return typed


def _typed_value(key: str, value, current):
    if not isinstance(value, str):
        return value
    try:
        if isinstance(current, bool):
            if value.lower() in ("true", "1", "yes"):
                return True
            if value.lower() in ("false", "0", "no"):
                return False
            raise ValueError(value)
        if isinstance(current, int):
            return int(value)
        if isinstance(current, float):
            return float(value)
        if isinstance(current, str):
            return value
        return json.loads(value)
    except (ValueError, json.JSONDecodeError):
        if current is None:
            return value
        raise ExportError(f"--set {key}={value}: expected a {type(current).__name__} "
                          f"like the current value {current!r}") from None


def parse_set_args(items: list[str] | None) -> dict:
    """['key=value', ...] -> {key: 'value'} (typing happens against the config)."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ExportError(f"--set {item!r}: expected key=value, e.g. --set num_hidden_layers=4")
        out[key.strip()] = value.strip()
    return out


def build_model(source: Source, config, seed: int | None, dtype: str = "fp32"):
    """The base decoder (`AutoModel`, no LM head) in eval mode, eager attention, in `dtype`."""
    import torch
    from transformers import AutoModel

    try:
        if source.kind == "random-init":
            torch.manual_seed(0 if seed is None else seed)
            model = AutoModel.from_config(config, attn_implementation="eager", dtype=torch.float32)
        else:
            model = AutoModel.from_pretrained(source.model_id, config=config, attn_implementation="eager",
                                              dtype=torch.float32)
    except OSError as exc:
        raise ExportError(f"cannot load weights of {source.model_id} ({_first_line(exc)}); no network here: "
                          f"pass a checkpoint folder, or --random-init") from None
    except (ValueError, RuntimeError) as exc:
        raise ExportError(f"cannot build {source.model_id} from its config ({_first_line(exc)}); check --set values")
    model = model.to(torch.float16 if dtype == "fp16" else torch.float32)
    return model.eval()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# ----------------------------------------------------------------------------- tokenizer

def load_tokenizer(source: Source, tokenizer: Path | None):
    """(transformers tokenizer, folder or hub id it came from); ExportError when there is none."""
    from transformers import AutoTokenizer

    if tokenizer is not None:
        where = Path(tokenizer).expanduser()
        if not where.is_dir() or not any((where / f).is_file() for f in TOKENIZER_FILES):
            raise ExportError(f"--tokenizer {tokenizer}: not a folder with tokenizer files "
                              f"(tokenizer.json, or vocab.json + merges.txt)")
    elif source.local_dir is not None and any((source.local_dir / f).is_file() for f in TOKENIZER_FILES):
        where = source.local_dir
    else:
        where = source.model_id
    try:
        return AutoTokenizer.from_pretrained(str(where)), where
    except (OSError, ValueError) as exc:
        raise ExportError(f"no tokenizer for {source.model_id} ({_first_line(exc)}); pass --tokenizer DIR, "
                          f"e.g. --tokenizer ../shared/data/tokenizer/opt") from None


def install_tokenizer(tok, where, dest: Path) -> None:
    """Copy the tokenizer's files into dest, and add tokenizer.json (what the device loads) if missing."""
    dest.mkdir(parents=True, exist_ok=True)
    if isinstance(where, Path):
        for name in TOKENIZER_FILES:
            if (where / name).is_file():
                shutil.copy2(where / name, dest / name)
    else:
        tok.save_pretrained(str(dest))
    if not (dest / "tokenizer.json").is_file():
        tok.backend_tokenizer.save(str(dest / "tokenizer.json"))


# ----------------------------------------------------------------------------- ONNX

def choose_exporter(model, exporter: str) -> str:
    """'torchscript' (fast, ~4x the weights in peak memory) unless the weights pass 2 GB, then 'dynamo'
    (slower, streams weights to backbone.onnx.data: opt-1.3b fits a 24 GB machine)."""
    if exporter not in EXPORTERS:
        raise ExportError(f"--exporter {exporter!r} unknown; choose one of {', '.join(EXPORTERS)}")
    if exporter != "auto":
        return exporter
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return "dynamo" if weight_bytes > EXTERNAL_DATA_THRESHOLD else "torchscript"


def trace_to_onnx(model, family, layers: list[int], dtype: str, path: Path, exporter: str,
                  progress: bool = False, tap_norm: str = "none") -> list[int]:
    """Export TappedDecoder to `path` (outputs hidden_{layer}, dims batch/seq); return each tap's width."""
    import torch

    from .tapped import TappedDecoder

    torch_dtype = torch.float16 if dtype == "fp16" else torch.float32
    wrapper = TappedDecoder(model, family, layers, torch_dtype, tap_norm).eval()
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
            axes = {n: {0: "batch", 1: "seq"} for n in [*inputs, *names]}
            torch.onnx.export(wrapper, (ids, mask), str(path), input_names=inputs, output_names=names,
                              dynamic_axes=axes, opset_version=onnx_codec.OPSET, do_constant_folding=True,
                              dynamo=False)
        else:
            batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
            shapes = {n: {0: batch, 1: seq} for n in inputs}
            # The dynamo exporter reports its own steps on stdout; stdout is for the summary.
            with contextlib.redirect_stdout(sys.stderr if progress else io.StringIO()), _quiet("torch.onnx"):
                program = torch.onnx.export(wrapper, (ids, mask), input_names=inputs, output_names=names,
                                            dynamic_shapes=shapes, opset_version=onnx_codec.OPSET, dynamo=True,
                                            optimize=True, verbose=False)
                program.save(str(path), external_data=True)
            del program
    return widths


def tap_specs(layers, widths, formats, block_size) -> list[dict]:
    return [{"output": f"hidden_{layer}", "fmt": fmt, "block_size": block_size, "hidden": width,
             "codes": f"tap{i}_codes", "scales": f"tap{i}_scales"}
            for i, (layer, width, fmt) in enumerate(zip(layers, widths, formats))]


def initializer_bytes(model) -> int:
    """Bytes of all initializers, without serializing (ByteSize fails past 2 GiB)."""
    total = 0
    for init in model.graph.initializer:
        n = int(np.prod(init.dims)) if len(init.dims) else 1
        total += n * _ELEM_SIZE.get(init.data_type, 4)
    return total


_ELEM_SIZE = {1: 4, 2: 1, 3: 1, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 16: 2, 21: 1, 22: 1}


def save_onnx(model, path: Path) -> str | None:
    """Save the graph; weights go to backbone.onnx.data when the file would pass 2 GiB."""
    import onnx

    external = initializer_bytes(model) > EXTERNAL_DATA_THRESHOLD
    location = path.name + ".data"
    onnx.save_model(model, str(path), save_as_external_data=external, all_tensors_to_one_file=True,
                    location=location, size_threshold=1024)
    return location if external else None


def codec_node_names(model) -> list[str]:
    """Nodes spliced in by onnx_codec (named 'tap{i}_codes/...'): weight quantization leaves them alone."""
    return [n.name for n in model.graph.node if re.match(r"^tap\d+_(codes|scales)", n.name)]


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
                _replace_data(inits[weight], numpy_helper.to_array(inits[weight]).T)
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
        _replace_data(init, numpy_helper.to_array(init).astype(np.float16))
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


def _uses_external_data(tensor) -> bool:
    from onnx import TensorProto

    return tensor.HasField("data_location") and tensor.data_location == TensorProto.EXTERNAL


def _replace_data(tensor, array: np.ndarray) -> None:
    """Overwrite an initializer's values, shape and dtype in place."""
    from onnx import helper

    array = np.ascontiguousarray(array)
    for field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
        tensor.ClearField(field)
    tensor.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
    del tensor.dims[:]
    tensor.dims.extend(array.shape)
    tensor.raw_data = array.tobytes()


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

            large = _size_of(src) > EXTERNAL_DATA_THRESHOLD
            quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=op_types,
                             nodes_to_exclude=exclude, per_channel=False, use_external_data_format=large,
                             extra_options={"MatMulConstBOnly": True})
            return {"tool": "onnxruntime.quantization.quantize_dynamic", "weight_type": "QInt8",
                    "op_types": op_types, "per_channel": False}
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        quantizer = MatMulNBitsQuantizer(onnx.load(str(src)), bits=4, block_size=INT4_BLOCK_SIZE, is_symmetric=True,
                                         nodes_to_exclude=exclude, op_types_to_quantize=tuple(op_types))
        quantizer.process()
        save_onnx(quantizer.model.model, dst)
    return {"tool": "onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer", "bits": 4,
            "block_size": INT4_BLOCK_SIZE, "is_symmetric": True, "op_types": op_types}


@contextlib.contextmanager
def _quiet(*logger_names: str):
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


@contextlib.contextmanager
def _quiet_ort_quantization():
    """ORT's quantizers log one line per node at INFO/WARNING; keep the export output readable."""
    with _quiet("", "onnxruntime.quantization.matmul_nbits_quantizer"):
        # All-zero rows (OPT's padding embedding) divide 0 by 0 in the int4 quantizer; their scale is 0.
        with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
            warnings.simplefilter("ignore", RuntimeWarning)
            yield


def _size_of(path: Path) -> int:
    """Bytes of a graph file and the files beside it (its external data)."""
    return sum(p.stat().st_size for p in path.parent.iterdir() if p.is_file())


def io_specs(model) -> tuple[list[dict], list[dict]]:
    """Names, dtypes and shapes (dim names for dynamic axes) of the graph's inputs and outputs."""
    from onnx import helper

    def spec(vi):
        t = vi.type.tensor_type
        dims = [d.dim_param or int(d.dim_value) for d in t.shape.dim]
        return {"name": vi.name, "dtype": str(helper.tensor_dtype_to_np_dtype(t.elem_type)), "shape": dims}

    return [spec(i) for i in model.graph.input], [spec(o) for o in model.graph.output]


def exporter_versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import torch
    import transformers

    from importlib.metadata import PackageNotFoundError, version

    try:
        mobillm = version("mobillm")
    except PackageNotFoundError:
        mobillm = "unknown"
    return {"mobillm": mobillm, "torch": torch.__version__, "transformers": transformers.__version__,
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "python": sys.version.split()[0]}


# ----------------------------------------------------------------------------- the pipeline

class _Stages:
    """One line per stage on stderr: [stage/total elapsed] what is starting."""

    def __init__(self, enabled: bool, total: int):
        self.enabled, self.total, self.n = enabled, total, 0
        self.t0 = time.perf_counter()

    def __call__(self, what: str) -> None:
        self.n += 1
        if self.enabled:
            elapsed = time.perf_counter() - self.t0
            print(f"[{self.n}/{self.total} {elapsed:6.1f}s] {what}", file=sys.stderr, flush=True)


def export_engine(model: str, out: Path, *, random_init: bool = False, overrides: dict | None = None,
                  tokenizer: Path | None = None, blocks=None, taps=None, quant="nf4", block_size: int = 64,
                  dtype: str = "fp32", weights: str | None = None, force: bool = False, seed: int = 0,
                  progress: bool = True, verify: bool = False, exporter: str = "auto",
                  quant_op: str = "onnx", trt: bool = False, tap_norm: str | None = None) -> Manifest:
    """Export `model` to the engine folder `out` and return its manifest.

    `quant_op`: "onnx" (standard-op quantizer subgraphs) or "custom" (one com.mobillm
    BlockQuantize node per tap; the op library is copied into the engine and named in the
    manifest). `trt` asks for a TensorRT engine plan, which needs TensorRT and a GPU.

    `tap_norm`: "none" (taps are the residual stream), "rms" (divided by its RMS), or None for the
    family's default ("rms" for Gemma 3, whose residual stream exceeds fp16's range).
    `weights=None` stores weights in the compute `dtype`. `exporter`: "torchscript", "dynamo" or
    "auto" (dynamo once the weights pass 2 GB). With `verify`, the engine is checked
    against the torch model before it is moved into place. Raises ExportError on bad input and
    leaves nothing at `out` when anything fails.
    """
    out = Path(out)
    source = resolve_source(model, random_init)
    weights = resolve_weights(dtype, weights)
    if block_size < 1:
        raise ExportError(f"--block-size {block_size}: must be >= 1")
    if exporter not in EXPORTERS:
        raise ExportError(f"--exporter {exporter!r} unknown; choose one of {', '.join(EXPORTERS)}")
    if quant_op not in ("onnx", "custom"):
        raise ExportError(f"--quant-op {quant_op!r} unknown; choose onnx or custom")
    if quant_op == "custom" and weights in ("int8", "int4"):
        raise ExportError("--quant-op custom with --weights int8/int4 is not supported yet (ORT's weight "
                          "quantizers do not load graphs with custom ops); use --quant-op onnx")
    if trt:
        _require_tensorrt()
    if out.exists() and not force:
        raise ExportError(f"{out} already exists; pass --force to replace it or choose another --out")
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a folder; remove it or choose another --out")
    if tap_norm is not None and tap_norm not in families.TAP_NORMS:
        raise ExportError(f"--tap-norm {tap_norm!r} unknown; choose one of {', '.join(families.TAP_NORMS)}")
    check_out_parent(out)
    prepare_source(source, progress)
    config = load_config(source)
    typed_overrides = apply_overrides(config, overrides or {})
    family = families.family_for(config.model_type)
    tap_norm = family.tap_norm if tap_norm is None else tap_norm
    if tap_norm == "layer" and family.input_norms is None:
        raise ExportError(f"--tap-norm layer: the {family.name} family row names no input norms; use none or rms")
    num_layers = family.num_layers(config)
    blocks, tap_layers = resolve_taps(num_layers, blocks, taps)
    formats = resolve_quant(quant, len(tap_layers))
    tok, tok_from = load_tokenizer(source, tokenizer)
    if len(tok) > config.vocab_size:
        raise ExportError(f"the tokenizer has {len(tok)} tokens but the model's vocab_size is {config.vocab_size}; "
                          f"use the model's own tokenizer")

    step = _Stages(progress, 7 + bool(verify))
    step(f"{model} ({source.kind}): {num_layers} layers, taps {_csv(tap_layers)}, quant {_csv(formats)}, "
         f"compute {dtype}, weights {weights}")
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent))
    try:
        manifest = _export_into(tmp, source, config, typed_overrides, family, blocks, tap_layers, formats,
                                block_size, dtype, weights, seed, exporter, tok, tok_from, step, progress,
                                quant_op, tap_norm)
        if verify:
            from .verify import VerificationFailed, verify_engine

            step("verifying the engine against torch")
            report = verify_engine(tmp)
            if progress:
                print(report.table(), file=sys.stderr)
            if not report.ok:
                raise VerificationFailed(report)
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _export_into(folder: Path, source: Source, config, overrides, family, blocks, tap_layers, formats,
                 block_size, dtype, weights, seed, exporter, tok, tok_from, step, progress,
                 quant_op: str = "onnx", tap_norm: str = "none") -> Manifest:
    import onnx
    from onnx.external_data_helper import load_external_data_for_model

    step(f"building {family.name} model, {family.num_layers(config)} layers"
         + (f", random init seed {seed}" if source.kind == "random-init" else ""))
    torch_model = build_model(source, config, seed, dtype)
    exporter = choose_exporter(torch_model, exporter)

    step(f"tracing to ONNX (torch.onnx.export, {exporter})")
    raw = folder / "_raw"
    raw.mkdir()
    widths = trace_to_onnx(torch_model, family, tap_layers, dtype, raw / GRAPH_NAME, exporter, progress, tap_norm)
    del torch_model
    gc.collect()

    step(f"adding in-graph quantizers ({_csv(formats)}, block {block_size})")
    graph = onnx.load(str(raw / GRAPH_NAME), load_external_data=False)
    specs = tap_specs(tap_layers, widths, formats, block_size)
    onnx_codec.append_quantizers(graph, specs, op=quant_op)
    op_library = _install_op_library(folder) if quant_op == "custom" else None
    exclude = codec_node_names(graph)
    inputs, outputs = io_specs(graph)

    step(f"writing {GRAPH_NAME} (weights {weights})")
    weight_quant = {}
    raw_files = sorted(p.name for p in raw.iterdir())
    if (weights == dtype and initializer_bytes(graph) > EXTERNAL_DATA_THRESHOLD
            and raw_files == [GRAPH_NAME, EXTERNAL_DATA_NAME]):
        # Large and stored as exported: keep the weights file the dynamo exporter streamed out,
        # never holding the weights in memory.
        onnx.save_model(graph, str(folder / GRAPH_NAME))
        (raw / EXTERNAL_DATA_NAME).rename(folder / EXTERNAL_DATA_NAME)
        external = EXTERNAL_DATA_NAME
    elif weights in ("int8", "int4"):
        stage = folder / "_stage"
        stage.mkdir()
        if any(_uses_external_data(i) for i in graph.graph.initializer):
            # Weights still on disk: rewire the graph, stream the weights (never all in memory).
            copy_external_data(graph, raw, stage, transpose=gemm_to_matmul(graph, weights_dir=raw))
            onnx.save_model(graph, str(stage / GRAPH_NAME))
        else:
            gemm_to_matmul(graph)
            save_onnx(graph, stage / GRAPH_NAME)
        del graph
        shutil.rmtree(raw)
        gc.collect()
        weight_quant = quantize_weights(stage / GRAPH_NAME, folder / GRAPH_NAME, weights, exclude)
        shutil.rmtree(stage)
        external = EXTERNAL_DATA_NAME if (folder / EXTERNAL_DATA_NAME).exists() else None
        if any(p.name not in (GRAPH_NAME, EXTERNAL_DATA_NAME) for p in folder.iterdir()):
            external = _consolidate(folder)
    else:
        load_external_data_for_model(graph, str(raw))
        shutil.rmtree(raw)
        if weights == "fp16" and dtype == "fp32":
            weights_to_fp16(graph)
        external = save_onnx(graph, folder / GRAPH_NAME)
        del graph
    shutil.rmtree(raw, ignore_errors=True)
    gc.collect()

    step(f"copying tokenizer from {tok_from}")
    install_tokenizer(tok, tok_from, folder / TOKENIZER_DIR)

    step("writing manifest.json")
    pad = tok.pad_token_id if tok.pad_token_id is not None else config.pad_token_id
    manifest = Manifest(
        model_id=source.model_id,
        family=family.name,
        config=json.loads(config.to_json_string(use_diff=False)),
        num_layers=family.num_layers(config),
        blocks=blocks,
        taps=[{"layer": s_layer, "hidden": s["hidden"], "fmt": s["fmt"], "block_size": block_size,
               "codes_output": s["codes"], "scales_output": s["scales"]}
              for s_layer, s in zip(tap_layers, specs)],
        head_hidden=widths[-1],
        max_length=family.max_length(config),
        compute_dtype=dtype,
        weights=weights,
        graph=GRAPH_NAME,
        tokenizer_dir=TOKENIZER_DIR,
        inputs=inputs,
        outputs=outputs,
        opset=onnx_codec.OPSET,
        quant_op=quant_op,
        custom_op_library=op_library,
        pad_token_id=int(pad if pad is not None else 0),
        tokens=token_rules(family, tok, config),
        tap_norm=tap_norm,
        gguf=source.gguf.to_dict() if source.gguf else None,
        exporter={**exporter_versions(), "exporter": f"torch.onnx.export ({exporter})"},
        source=source.kind,
        seed=seed if source.kind == "random-init" else None,
        overrides=overrides,
        external_data=external,
        weight_quant=weight_quant,
    )
    manifest.save(folder)
    return manifest


def token_rules(family, tok, config) -> dict:
    """The family's tokenizer rules with this tokenizer's ids, as the device applies them."""
    rules = family.tokens
    bos = tok.bos_token_id if tok.bos_token_id is not None else config.bos_token_id
    eos = tok.eos_token_id if tok.eos_token_id is not None else config.eos_token_id
    return {"bos_id": int(bos) if rules.bos and bos is not None else None,
            "bos_each_segment": rules.bos_each_segment,
            "eos_id": int(eos) if rules.eos and eos is not None else None}


def check_out_parent(out: Path) -> None:
    """--out must be creatable: its nearest existing parent a writable folder (not a file, not /proc)."""
    parent = Path(out).absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ExportError(f"--out {out}: {parent} is a file, not a folder; choose another --out")
    if not os.access(parent, os.W_OK) or str(parent).startswith(("/proc", "/sys")):
        raise ExportError(f"--out {out}: cannot write under {parent}; choose another --out")


def _install_op_library(folder: Path) -> str:
    """Copy the com.mobillm custom-op library into the engine; the manifest names it (and its sha256)."""
    from mobillm.kernels import native

    try:
        lib = native.ensure_library("ort_ops")
    except native.NativeUnavailable as exc:
        raise ExportError(f"--quant-op custom needs the native op library: {exc}") from None
    shutil.copy2(lib, folder / lib.name)
    return lib.name


def _require_tensorrt() -> None:
    """--trt: say plainly (exit 2) when TensorRT or a GPU is missing, before any work."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        raise ExportError("--trt needs TensorRT (pip install tensorrt) and an NVIDIA GPU; neither TensorRT nor "
                          "its Python bindings are installed here. Without --trt, edge-run --provider tensorrt "
                          "builds a TensorRT engine on the device through ONNX Runtime's TensorRT provider") from None
    raise ExportError("--trt: building a TensorRT plan with the BlockQuantize plugin is not implemented yet; "
                      "use edge-run --provider tensorrt (ONNX Runtime's TensorRT execution provider) on the device")


def _consolidate(folder: Path) -> str | None:
    """Rewrite a graph whose weights a quantizer spread over several files into graph + one .data file."""
    import onnx

    graph = onnx.load(str(folder / GRAPH_NAME))
    for p in folder.iterdir():
        if p.is_file():
            p.unlink()
    return save_onnx(graph, folder / GRAPH_NAME)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_partials(out: Path) -> list[Path]:
    """Remove what an export killed mid-way (SIGKILL, out of memory, a crash in native code) left
    beside `out`: `.NAME.partial-PID-*` / `.NAME.old-PID-*` folders whose process is gone. Folders of
    a live export (same name, another process) are left alone. Returns what was removed."""
    removed = []
    for kind in ("partial", "old"):
        for path in out.parent.glob(f".{out.name}.{kind}-*"):
            m = re.fullmatch(rf"\.{re.escape(out.name)}\.{kind}-(\d+)-.*", path.name)
            if path.is_dir() and m and not _pid_alive(int(m.group(1))):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished temp folder to `out`, replacing an old engine only at the very end."""
    if out.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{os.getpid()}-", dir=out.parent))
        out.rename(trash / out.name)
        tmp.rename(out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        tmp.rename(out)


def file_sizes(folder: Path, manifest: Manifest) -> dict[str, int]:
    return {rel: (Path(folder) / rel).stat().st_size for rel in manifest.files}


def summary(folder: Path, manifest: Manifest) -> str:
    """What was written: files and sizes, taps, and wire bytes per token."""
    folder = Path(folder)
    sizes = file_sizes(folder, manifest)
    lines = [f"engine {folder}  ({manifest.model_id}, {manifest.family}, {manifest.num_layers} layers, "
             f"compute {manifest.compute_dtype}, weights {manifest.weights})"]
    for rel, size in sizes.items():
        lines.append(f"  {rel:<40} {_human(size):>10}")
    lines.append(f"  total {_human(sum(sizes.values())):>45}")
    lines.append(f"blocks {_csv(manifest.blocks)}")
    lines.append("tap  layer  width  format  block  bytes/token  outputs")
    for i, t in enumerate(manifest.taps):
        lines.append(f"{i:>3}  {t.layer:>5}  {t.hidden:>5}  {t.fmt:>6}  {t.block_size:>5}  {t.bytes_per_token:>11}  "
                     f"{t.codes_output}, {t.scales_output}")
    lines.append(f"wire: {manifest.bytes_per_token()} bytes per sample per token (all taps); "
                 f"head reads {manifest.head_hidden} wide; max_length {manifest.max_length}")
    return "\n".join(lines)


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
