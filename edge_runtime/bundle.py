"""`edge-run bundle`: the engine and a trained side network as ONE portable ONNX graph.

    input_ids, attention_mask (int64 [batch, seq], right-padded)
      -> backbone (the engine's standard-op graph, taps quantized in the graph as in training)
      -> the rows the side network reads, dequantized           (edge_runtime/predict.py SideFeed)
      -> side network -> logits, probabilities (softmax; classification only)

Any ONNX Runtime binding runs it (Python, C/C++, Java/Kotlin on Android, Swift/ObjC on iOS,
onnxruntime-node, onnxruntime-web): no custom op, no Python glue. The folder also holds
`tokenizer.json`, `labels.json` and `bundle.json` (model, task, engine sha256, max length, how to
frame the token ids); docs/bundle.md shows the few lines an app needs.

The graph is built with the `onnx` package, imported here only when a bundle is made: the device
runtime itself never needs it. `BundleModel` runs a bundle folder with onnxruntime + tokenizers.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from mobillm.common.errors import BadInput
from mobillm.common.manifest import TEXT_HYGIENE, Manifest, ManifestError, manifest_digest, sha256_file
from mobillm.common.messages import SIDE_MASK, SIDE_OUTPUT, side_input_names
from mobillm.common.tasks import Task
from mobillm.common.tokenize import EngineTokenizer

from .predict import SideFeed, check_preparation, check_side_engine, read_side_meta

BUNDLE_FORMAT = "mobillm-bundle"
BUNDLE_VERSION = 1
MODEL_FILE = "model.onnx"
META_FILE = "bundle.json"
LABELS_FILE = "labels.json"
TOKENIZER_FILE = "tokenizer.json"
INPUTS = ("input_ids", "attention_mask")
LOGITS, PROBABILITIES = "logits", "probabilities"
# Above this the weights go to model.onnx.data beside the graph (protobuf's 2 GiB limit).
INLINE_LIMIT = 1_800_000_000
PREFIX = "bundle/"


class BundleError(BadInput, ValueError):
    """The bundle cannot be built or read as asked; the message says why and what to do."""


@dataclass
class BundleInfo:
    """What `build_bundle` wrote."""

    folder: Path
    meta: dict
    size_bytes: int


def build_bundle(engine: Path | str, side: Path | str, out: Path | str, task: Task, labels: tuple[str, ...],
                 max_len: int) -> BundleInfo:
    """Write the bundle folder `out` for the engine folder `engine` and side network `side`."""
    try:
        import onnx
    except ImportError:
        raise BundleError("edge-run bundle needs the onnx package on this machine (pip install onnx); "
                          "the bundle it writes runs without it") from None
    from mobillm.kernels.onnx_codec import dequantize_subgraph, merge_opsets

    engine, side, out = Path(engine), Path(side), Path(out)
    if not engine.is_dir():
        raise ManifestError(f"{engine}: engine folder not found; run export-backbone first and copy its --out here")
    manifest = Manifest.load(engine, verify=True)
    if not side.is_file():
        raise ManifestError(f"{side}: side network not found; train with `edge-run train` first")
    if manifest.custom_op_library and not manifest.fused_graph:
        raise BundleError(f"{engine}: this engine's only graph uses the com.mobillm op, which other ONNX Runtime "
                          f"builds lack; re-export it (export-backbone) to get a standard-op graph")
    side_model = onnx.load(str(side))
    meta = read_side_meta(side)
    widths = [int(i.type.tensor_type.shape.dim[-1].dim_value) for i in side_model.graph.input if i.name != SIDE_MASK]
    check_side_engine(side, meta, engine, manifest, widths)
    check_preparation(side, meta, engine, manifest)
    feed = SideFeed.for_side(meta)

    backbone = onnx.load(str(engine / manifest.graph))  # with its external weights
    graph = backbone.graph
    nodes: list = []
    inits: list = []
    b = _Nodes(nodes, inits)

    # Step by step what SideFeed does in numpy (edge_runtime/predict.py); a step it does not know is refused.
    ids, mask = INPUTS
    shape = b.op("Shape", [ids], "shape")
    batch = b.op("Gather", [shape, b.const(0)], "batch", axis=0)
    width = b.op("Gather", [shape, b.const(1)], "width", axis=0)
    # Each batch row holds `stride` tap positions: its tokens, then a summary row in engines that have one.
    stride = b.op("Add", [width, b.const(1)], "stride") if manifest.summary_row else width
    starts = b.op("Mul", [b.op("Range", [b.const(0), batch, b.const(1)], "row"), stride], "row_start")
    last = b.op("Sub", [b.op("ReduceSum", [mask, b.const([1])], "lengths", keepdims=0), b.const(1)], "last")
    rows = layout = place = None
    for step in feed.steps:
        if step == "rows:pooled":  # each row's last real token, as backbone.row_indices
            rows = b.op("Add", [starts, last], "rows")
        elif step == "rows:summary":  # its last token, then its summary row (position `width`)
            pair = [b.op("Unsqueeze", [b.op("Add", [starts, last]), b.const([1])], "last_row"),
                    b.op("Unsqueeze", [b.op("Add", [starts, width]), b.const([1])], "summary_row")]
            rows = b.op("Reshape", [b.op("Concat", pair, "pairs", axis=1), b.const([-1])], "rows")
        elif step == "rows:tokens":  # every real token, row by row
            nz = b.op("NonZero", [mask], "real")  # [2, n]: batch row, token
            row_of, tok = (b.op("Gather", [nz, b.const(k)], axis=0) for k in (0, 1))
            rows = b.op("Add", [b.op("Mul", [row_of, stride]), tok], "rows")
            place = b.op("Add", [b.op("Mul", [row_of, width]), tok], "place")  # in [batch, width]
        elif step == "dequantize":
            pass  # below, per tap, after the rows are gathered
        elif step in ("layout:row", "layout:padded", "layout:summary"):
            layout = step.split(":")[1]
        else:
            raise BundleError(f"edge-run predict feeds the side network with step {step!r}, which edge-run bundle "
                              f"cannot build in the graph yet (edge_runtime/bundle.py)")
    if rows is None or layout is None or "dequantize" not in feed.steps:
        raise BundleError(f"side-network feed {feed.steps} lacks a row selection, dequantize or layout step")

    side_prefix = "side/"
    side_model = onnx.compose.add_prefix(side_model, side_prefix)
    side_inputs = [side_prefix + n for n in side_input_names(len(manifest.taps))]
    if manifest.row_input:
        nodes.append(onnx.helper.make_node("Identity", [rows], [manifest.row_input], name=PREFIX + "row_input"))
    for name, value in manifest.switch_feed().items():  # the engine's own formats
        inits.append(onnx.numpy_helper.from_array(value, name))
    fixed = {manifest.row_input, *manifest.switch_feed()}
    for k, spec in enumerate(manifest.taps):
        codes, scales = spec.graph_outputs
        if not manifest.row_input:  # older engines quantize every token: keep the rows after the fact
            codes = b.op("Gather", [b.op("Reshape", [codes, b.const([-1, _code_width(spec)])]), rows], f"tap{k}_codes",
                         axis=0)
            if spec.fmt != "fp16":
                scales = b.op("Gather", [b.op("Reshape", [scales, b.const([-1, _n_scales(spec)])]), rows],
                              f"tap{k}_scales", axis=0)
        dq_nodes, dq_inits, values = dequantize_subgraph(codes, scales, spec.fmt, spec.block_size, spec.hidden,
                                                         prefix=f"{PREFIX}tap{k}/dequantize")
        nodes.extend(dq_nodes)
        inits.extend(dq_inits)
        if layout == "row":  # [rows, H] -> [batch, 1, H]
            nodes.append(onnx.helper.make_node("Unsqueeze", [values, b.const([1])], [side_inputs[k]],
                                               name=PREFIX + f"tap{k}_row"))
        elif layout == "summary":  # [2 * batch, H] -> [batch, 2, H]
            nodes.append(onnx.helper.make_node("Reshape", [values, b.const([-1, 2, spec.hidden])], [side_inputs[k]],
                                               name=PREFIX + f"tap{k}_pair"))
        else:  # every real token back in place in a zero-padded [batch, width, H]
            cells = b.op("Mul", [batch, width], "cells")
            zeros = b.op("ConstantOfShape", [b.op("Concat", [b.op("Unsqueeze", [cells, b.const([0])]),
                                                             b.const([spec.hidden])], axis=0)], f"tap{k}_zeros",
                         value=onnx.helper.make_tensor("zero", onnx.TensorProto.FLOAT, [1], [0.0]))
            if place is None:
                raise BundleError(f"side-network feed {feed.steps}: a padded layout needs every real token's rows")
            placed = b.op("ScatterND", [zeros, b.op("Unsqueeze", [place, b.const([1])]), values], f"tap{k}_placed")
            dims = b.op("Concat", [b.op("Unsqueeze", [batch, b.const([0])]), b.op("Unsqueeze", [width, b.const([0])]),
                                   b.const([spec.hidden])], f"tap{k}_dims", axis=0)
            nodes.append(onnx.helper.make_node("Reshape", [placed, dims], [side_inputs[k]], name=PREFIX + f"tap{k}_pad"))
    if layout in ("row", "summary"):  # every kept row is real
        dims = b.op("Concat", [b.op("Unsqueeze", [batch, b.const([0])]), b.const([1 if layout == "row" else 2])],
                    "mask_dims", axis=0)
        nodes.append(onnx.helper.make_node("ConstantOfShape", [dims], [side_inputs[-1]], name=PREFIX + "mask",
                                           value=onnx.helper.make_tensor("one", onnx.TensorProto.FLOAT, [1], [1.0])))
    else:
        nodes.append(onnx.helper.make_node("Cast", [mask], [side_inputs[-1]], name=PREFIX + "mask",
                                           to=onnx.TensorProto.FLOAT))
    nodes.extend(side_model.graph.node)
    inits.extend(side_model.graph.initializer)
    nodes.append(onnx.helper.make_node("Identity", [side_prefix + SIDE_OUTPUT], [LOGITS], name=PREFIX + LOGITS))
    outputs = [onnx.helper.make_tensor_value_info(LOGITS, onnx.TensorProto.FLOAT, ["batch", task.out_dim])]
    if task.kind != "regression":
        nodes.append(onnx.helper.make_node("Softmax", [LOGITS], [PROBABILITIES], name=PREFIX + "softmax", axis=-1))
        outputs.append(onnx.helper.make_tensor_value_info(PROBABILITIES, onnx.TensorProto.FLOAT,
                                                          ["batch", task.out_dim]))

    graph.node.extend(nodes)
    graph.initializer.extend(inits)
    kept_inputs = [i for i in graph.input if i.name not in fixed]
    del graph.input[:]
    graph.input.extend(kept_inputs)
    del graph.output[:]
    graph.output.extend(outputs)
    _prune(graph)
    merge_opsets(backbone, side_model)
    missing = [n for n in INPUTS if n not in {i.name for i in graph.input}]
    if missing:
        raise BundleError(f"{engine / manifest.graph}: the backbone has no graph input {missing}; re-export the engine")

    return _write(backbone, out, engine, manifest, side, meta, feed, task, labels, max_len)


class _Nodes:
    """Appends named bundle nodes and int64 constants."""

    def __init__(self, nodes: list, inits: list):
        self.nodes, self.inits, self._n = nodes, inits, 0

    def _name(self, hint: str) -> str:
        self._n += 1
        return f"{PREFIX}{hint}_{self._n}"

    def const(self, value) -> str:
        from onnx import numpy_helper

        name = self._name("c")
        self.inits.append(numpy_helper.from_array(np.asarray(value, np.int64), name))
        return name

    def op(self, op_type: str, inputs: list[str], hint: str | None = None, **attrs) -> str:
        from onnx import helper

        out = self._name(hint or op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out


def _code_width(spec) -> int:
    from mobillm.kernels import codec

    return spec.hidden if spec.fmt == "fp16" else codec.code_bytes(spec.fmt, spec.hidden)


def _n_scales(spec) -> int:
    from mobillm.kernels import codec

    return codec.n_blocks(spec.hidden, spec.block_size)


def _subgraph_inputs(node) -> set[str]:
    """Outer-scope names an If/Loop/Scan body reads."""
    names: set[str] = set()
    for attr in node.attribute:
        for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
            made = {o for n in g.node for o in n.output} | {i.name for i in g.initializer} | {i.name for i in g.input}
            for n in g.node:
                names |= {i for i in n.input if i and i not in made}
                names |= _subgraph_inputs(n)
    return names


def _prune(graph) -> None:
    """Drop the nodes, initializers and inputs no output needs (the taps' other outputs, unused switches)."""
    all_nodes = list(graph.node)
    producer = {o: k for k, n in enumerate(all_nodes) for o in n.output}
    needed: set[str] = set()
    stack = [o.name for o in graph.output]
    keep_ids = set()
    while stack:
        name = stack.pop()
        if name in needed:
            continue
        needed.add(name)
        k = producer.get(name)
        if k is not None and k not in keep_ids:
            keep_ids.add(k)
            stack.extend(set(all_nodes[k].input) | _subgraph_inputs(all_nodes[k]))
    kept = [n for k, n in enumerate(all_nodes) if k in keep_ids]
    del graph.node[:]
    graph.node.extend(_topological(kept, {i.name for i in graph.input} | {i.name for i in graph.initializer}))
    inits = [i for i in graph.initializer if i.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    inputs = [i for i in graph.input if i.name in needed]
    del graph.input[:]
    graph.input.extend(inputs)
    infos = [v for v in graph.value_info if v.name in needed]
    del graph.value_info[:]
    graph.value_info.extend(infos)


def _topological(nodes: list, available: set[str]) -> list:
    """`nodes` in an order where each runs after what it reads (the row nodes feed the backbone's
    row input, so they go before it); otherwise in their given order."""
    made = {o for n in nodes for o in n.output}
    ready = set(available) | {""}
    pending, order = list(nodes), []
    while pending:
        rest = []
        for node in pending:
            reads = (set(node.input) | _subgraph_inputs(node)) & made
            if reads <= ready:
                order.append(node)
                ready.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise BundleError(f"the bundle graph has a cycle or a missing input at node {rest[0].name!r}")
        pending = rest
    return order


def _write(model, out: Path, engine: Path, manifest: Manifest, side: Path, meta: dict, feed: SideFeed, task: Task,
           labels: tuple[str, ...], max_len: int) -> BundleInfo:
    import onnx

    if out.exists() and any(out.iterdir()) and not (out / META_FILE).is_file():
        raise BundleError(f"{out}: exists and is not a bundle folder; give a new or empty --out")
    tmp = out.with_name(out.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights = sum(len(i.raw_data) for i in model.graph.initializer)
    if weights > INLINE_LIMIT:
        onnx.save_model(model, str(tmp / MODEL_FILE), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=MODEL_FILE + ".data")
    else:
        for init in model.graph.initializer:  # loaded from the engine's .data file: store them inline
            if init.data_location == onnx.TensorProto.EXTERNAL:
                init.data_location = onnx.TensorProto.DEFAULT
                del init.external_data[:]
        onnx.save_model(model, str(tmp / MODEL_FILE))
    _write_tokenizer(engine / manifest.tokenizer_dir, tmp / TOKENIZER_FILE)
    (tmp / LABELS_FILE).write_text(json.dumps(list(labels)) + "\n")
    files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir())}
    rules = manifest.token_rules
    info = {
        "format": BUNDLE_FORMAT, "version": BUNDLE_VERSION,
        "model": manifest.model_id, "family": manifest.family, "weights": manifest.weights,
        "task": task.name, "kind": task.kind, "labels": list(labels),
        "engine_sha256": manifest_digest(engine), "side_sha256": sha256_file(side), "run": meta.get("run"),
        "max_length": int(min(max_len, manifest.max_length)),
        "tokenizer": {"file": TOKENIZER_FILE, "strip": TEXT_HYGIENE == "strip", "bos_id": rules.get("bos_id"),
                      "bos_each_segment": bool(rules.get("bos_each_segment", True)), "eos_id": rules.get("eos_id"),
                      "pad_id": manifest.pad_token_id, "add_special_tokens": False, "padding": "right",
                      "truncation": "framed ids cut to max_length", "segments": len(task.text_cols)},
        "inputs": {n: "int64 [batch, seq]" for n in INPUTS},
        "outputs": {LOGITS: f"float32 [batch, {task.out_dim}]",
                    **({PROBABILITIES: f"float32 [batch, {task.out_dim}]"} if task.kind != "regression" else {})},
        "feed": list(feed.steps), "preparation": manifest.preparation, "opsets": {o.domain or "ai.onnx": o.version for o in model.opset_import},
        "files": files,
    }
    (tmp / META_FILE).write_text(json.dumps(info, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.replace(out)
    return BundleInfo(out, info, sum(p.stat().st_size for p in out.iterdir()))


def _write_tokenizer(folder: Path, dest: Path) -> None:
    """The engine's tokenizer as one tokenizer.json (OPT engines may hold vocab.json + merges.txt)."""
    if (folder / TOKENIZER_FILE).is_file():
        shutil.copyfile(folder / TOKENIZER_FILE, dest)
        return
    from tokenizers import ByteLevelBPETokenizer

    ByteLevelBPETokenizer(str(folder / "vocab.json"), str(folder / "merges.txt")).save(str(dest))


class BundleModel:
    """A bundle folder run with onnxruntime + tokenizers: texts -> logits, as `JointModel.predict`."""

    def __init__(self, folder: Path | str, threads: int | None = None):
        self.folder = Path(folder)
        meta_path = self.folder / META_FILE
        if not meta_path.is_file():
            raise BundleError(f"{self.folder}: no {META_FILE}; make a bundle with `edge-run bundle` first")
        self.meta = json.loads(meta_path.read_text())
        if self.meta.get("format") != BUNDLE_FORMAT or self.meta.get("version") != BUNDLE_VERSION:
            raise BundleError(f"{meta_path}: not a {BUNDLE_FORMAT} v{BUNDLE_VERSION} bundle")
        self.digest = hashlib.sha256(meta_path.read_bytes()).hexdigest()
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(self.folder / MODEL_FILE), opts, providers=["CPUExecutionProvider"])
        tok = self.meta["tokenizer"]
        self.tokenizer = EngineTokenizer(self.folder, tok)
        self.pad_id = int(tok["pad_id"])
        self.max_length = int(self.meta["max_length"])

    def tokenize(self, texts: tuple[str, ...], max_len: int | None = None) -> np.ndarray:
        limit = min(max_len or self.max_length, self.max_length)
        return np.asarray(self.tokenizer.encode(texts)[:limit], np.int64)

    def logits(self, rows: list[np.ndarray]) -> np.ndarray:
        """Logits [len(rows), out_dim] for token-id rows (right-padded into one batch)."""
        width = max(len(r) for r in rows)
        ids = np.full((len(rows), width), self.pad_id, np.int64)
        mask = np.zeros((len(rows), width), np.int64)
        for i, r in enumerate(rows):
            ids[i, : len(r)], mask[i, : len(r)] = r, 1
        return self.session.run([LOGITS], {"input_ids": ids, "attention_mask": mask})[0]
