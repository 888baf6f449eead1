"""Local inference with the joint model: ORT backbone + ORT side network, no torch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tqdm import tqdm

from mobillm.common.manifest import Manifest, ManifestError, manifest_digest
from mobillm.common.messages import SIDE_MASK, SIDE_OUTPUT, side_input_names
from mobillm.common.tasks import Task, score
from mobillm.kernels import codec

from .backbone import Backbone, TapOutput, choose_providers
from .data import Example
from .batches import plan_batches


class SideFeed:
    """Backbone taps -> side-network inputs: the one recipe `JointModel` runs in numpy and
    `edge-run bundle` (edge_runtime/bundle.py) translates step by step into ONNX nodes.

    `steps` names what is done, in order; the bundle refuses a step it has no translation for, and
    tests/edge_runtime/test_bundle.py checks that both give the same logits. Change the two together.
    """

    def __init__(self, mode: str, pooling: str):
        # `mode`: the rows the side network was trained on (the device's send mode, recorded beside it).
        # Only those rows are quantized: each row's last real token (pooled), that and the masked mean
        # of its tokens (summary), or every real token (tokens), put back in place in a zero-padded
        # batch under the mask for mean pooling.
        self.keep, self.pooling = mode, pooling
        self.layout = "summary" if mode == "summary" else "row" if pooling == "last" else "padded"
        self.steps = (f"rows:{self.keep}", "dequantize", f"layout:{self.layout}")

    @classmethod
    def for_side(cls, meta: dict) -> "SideFeed":
        """The feed a side network's metadata (the JSON beside it) asks for."""
        pooling = meta.get("config", {}).get("pooling", "last")
        mode = meta.get("mode") or ("pooled" if pooling == "last" else "tokens")
        if mode == "summary" and pooling == "last":  # a last-pooling (federated) server read the last token only
            mode = "pooled"
        return cls(mode, pooling)

    def feeds(self, taps: list[TapOutput], lengths: np.ndarray, inputs: list[str]) -> dict[str, np.ndarray]:
        """The side network's feeds (`inputs`: its tap input names, then SIDE_MASK) from `Backbone.forward`'s
        taps of rows `self.keep` and the real length of each row."""
        feeds: dict[str, np.ndarray] = {}
        if self.layout == "summary":  # two rows a sample: the last token and the tokens' mean, both real
            for name, tap in zip(inputs, taps):
                feeds[name] = dequantize(tap).reshape(len(lengths), 2, tap.spec.hidden)
            feeds[SIDE_MASK] = np.ones((len(lengths), 2), np.float32)
        elif self.layout == "row":
            for name, tap in zip(inputs, taps):
                feeds[name] = dequantize(tap)[:, None, :]
            feeds[SIDE_MASK] = np.ones((len(lengths), 1), np.float32)
        else:
            real = np.arange(int(lengths.max()))[None, :] < lengths[:, None]
            for name, tap in zip(inputs, taps):
                values = np.zeros(real.shape + (tap.spec.hidden,), np.float32)
                values[real] = dequantize(tap)
                feeds[name] = values
            feeds[SIDE_MASK] = real.astype(np.float32)
        return feeds


def dequantize(tap: TapOutput) -> np.ndarray:
    """A tap's kept rows in fp32, as the server decoded them in training."""
    s = tap.spec
    return codec.decode_arrays(tap.codes, tap.scales, s.fmt, s.hidden, s.block_size)


def read_side_meta(side_path: Path | str) -> dict:
    """The side network's metadata (the JSON `edge-run train` writes beside it), or {} when absent."""
    meta_path = Path(side_path).with_suffix(".json")
    try:
        return json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    except (OSError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{meta_path}: unreadable side-network metadata ({exc}); train again or remove it") from None


def check_preparation(side_path: Path, meta: dict, folder: Path, manifest: Manifest) -> None:
    """ManifestError when the side network was trained on taps prepared otherwise than this engine
    prepares them (tap norm, channel conditioning, text hygiene): its inputs would mean something else."""
    trained = meta.get("preparation")
    if trained is None:  # side networks saved before the preparation was recorded
        return
    here = manifest.preparation
    if trained != here:
        raise ManifestError(f"{side_path} was trained on taps prepared as {json.dumps(trained, sort_keys=True)}, "
                            f"but the engine {folder} prepares them as {json.dumps(here, sort_keys=True)}; "
                            f"use the engine it was trained with, or train again on this one")


def check_side_engine(side_path: Path, meta: dict, folder: Path, m: Manifest, got: list[int]) -> None:
    """ManifestError naming both engines when the side network was trained on another engine's taps
    (`got`: the widths of the side network's tap inputs)."""
    digest = manifest_digest(folder)
    here = f"this engine is {m.model_id} ({folder}, sha256 {digest[:12]})"
    trained = meta.get("engine_sha256")
    if trained and trained != digest:
        raise ManifestError(f"{side_path}: side network was trained for engine {meta.get('model_id', '?')} "
                            f"(sha256 {trained[:12]}, {meta.get('engine', '?')}); {here}")
    widths = [t.hidden for t in m.taps]
    meta_taps = [(t.get("layer"), t.get("hidden")) for t in meta.get("taps", []) if isinstance(t, dict)]
    if got != widths or (meta_taps and meta_taps != [(t.layer, t.hidden) for t in m.taps]):
        raise ManifestError(f"{side_path}: side network was trained for another engine "
                            f"({meta.get('engine', 'taps of widths ' + str(got))}); {here} with tap widths {widths}")


class JointModel:
    """The frozen backbone and the trained side network, both as ONNX Runtime sessions."""

    def __init__(self, backbone: Backbone, side_path: Path | str):
        side_path = Path(side_path)
        if not side_path.is_file():
            raise ManifestError(f"{side_path}: side network not found; train with `edge-run train` first")
        self.meta = read_side_meta(side_path)
        self.bb = backbone
        self.session = ort.InferenceSession(str(side_path), providers=choose_providers(backbone.provider, backbone.folder))
        check_side_engine(side_path, self.meta, backbone.folder, backbone.manifest,
                          [i.shape[-1] for i in self.session.get_inputs() if i.name != SIDE_MASK])
        names = {i.name for i in self.session.get_inputs()}
        self.inputs = side_input_names(len(backbone.manifest.taps))[:-1]  # the taps; the mask comes last
        missing = [n for n in self.inputs + [SIDE_MASK] if n not in names]
        if missing:
            raise ManifestError(f"{side_path}: side network lacks inputs {missing}; it was trained for another engine")
        self.feed = SideFeed.for_side(self.meta)
        self.pooling, self.mode = self.feed.pooling, self.feed.keep
        check_preparation(side_path, self.meta, backbone.folder, backbone.manifest)

    def logits(self, rows: list[np.ndarray]) -> np.ndarray:
        """Head outputs [len(rows), out_dim] for token-id rows."""
        taps, lengths = self.bb.forward(rows, keep=self.feed.keep)
        return self.session.run([SIDE_OUTPUT], self.feed.feeds(taps, lengths, self.inputs))[0]

    def predict(self, examples: list[Example], max_len: int, batch_size: int = 16, progress: bool = True) -> np.ndarray:
        """Logits for every example, in input order (batched by length to cut padding)."""
        rows = [self.bb.tokenize(e.texts, max_len)[0] for e in examples]
        out = None
        batches = plan_batches(np.array([len(r) for r in rows]), batch_size, 1, seed=0)
        for idx in tqdm(batches, desc="predict", unit="batch", disable=not progress):
            logits = self.logits([rows[i] for i in idx])
            if out is None:
                out = np.zeros((len(rows), logits.shape[-1]), np.float32)
            out[idx] = logits
        return out if out is not None else np.zeros((0, 0), np.float32)

    def evaluate(self, examples: list[Example], task: Task, max_len: int, batch_size: int = 16,
                 progress: bool = True) -> dict:
        outputs = self.predict(examples, max_len, batch_size, progress)
        gold = np.array([e.label for e in examples])
        return score(task, outputs, gold)


def check_side_task(side_path: Path | str, meta: dict, task: Task) -> None:
    """ManifestError naming both tasks when the side network was trained for another task."""
    trained = meta.get("task")
    if trained and trained != task.name:
        raise ManifestError(f"{side_path}: side network was trained for task {trained}, not {task.name}; "
                            f"pass --task {trained} or the side network trained for {task.name}")
    n = meta.get("num_labels")
    if task.kind != "regression" and isinstance(n, int) and n != task.num_labels:
        raise ManifestError(f"{side_path}: side network has {n} classes, task {task.name} has {task.num_labels}")


def softmax(logits: np.ndarray) -> np.ndarray:
    """Class probabilities [n, classes] from logits, in float64 then float32."""
    z = np.asarray(logits, np.float64)
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return (z / z.sum(axis=-1, keepdims=True)).astype(np.float32)


def readable(texts: list[str], outputs: np.ndarray, task: Task, labels: tuple[str, ...]) -> list[dict]:
    """One record per input: the class name, its probability and every class's (classification), or
    the value (regression); the class index and logits too, for scripts."""
    out = []
    if task.kind == "regression":
        for text, row in zip(texts, outputs):
            out.append({"text": text, "value": float(row[0]), "prediction": float(row[0]),
                        "logits": [float(v) for v in row]})
        return out
    for text, row, probs in zip(texts, outputs, softmax(outputs)):
        k = int(row.argmax())
        out.append({"text": text, "label": labels[k], "score": float(probs[k]),
                    "probabilities": {name: float(p) for name, p in zip(labels, probs)},
                    "prediction": k, "logits": [float(v) for v in row]})
    return out
