"""Local inference with the joint model: ORT backbone + ORT side network, no torch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tqdm import tqdm

from mobillm.common.manifest import ManifestError
from mobillm.common.messages import SIDE_MASK, SIDE_OUTPUT, side_input_names
from mobillm.common.tasks import Task, score
from mobillm.kernels import codec

from .backbone import Backbone, choose_providers
from .data import Example
from .batches import plan_batches


def check_preparation(side_path: Path, meta: dict, backbone: Backbone) -> None:
    """ManifestError when the side network was trained on taps prepared otherwise than this engine
    prepares them (tap norm, channel conditioning, text hygiene): its inputs would mean something else."""
    trained = meta.get("preparation")
    if trained is None:  # side networks saved before the preparation was recorded
        return
    here = backbone.manifest.preparation
    if trained != here:
        raise ManifestError(f"{side_path} was trained on taps prepared as {json.dumps(trained, sort_keys=True)}, "
                            f"but the engine {backbone.folder} prepares them as {json.dumps(here, sort_keys=True)}; "
                            f"use the engine it was trained with, or train again on this one")


class JointModel:
    """The frozen backbone and the trained side network, both as ONNX Runtime sessions."""

    def __init__(self, backbone: Backbone, side_path: Path | str):
        side_path = Path(side_path)
        if not side_path.is_file():
            raise ManifestError(f"{side_path}: side network not found; train with `edge-run train` first")
        meta_path = side_path.with_suffix(".json")
        self.meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        self.bb = backbone
        self.session = ort.InferenceSession(str(side_path), providers=choose_providers(backbone.provider, backbone.folder))
        names = {i.name for i in self.session.get_inputs()}
        self.inputs = side_input_names(len(backbone.manifest.taps))[:-1]  # the taps; the mask comes last
        missing = [n for n in self.inputs + [SIDE_MASK] if n not in names]
        if missing:
            raise ManifestError(f"{side_path}: side network lacks inputs {missing}; it was trained for another engine")
        self.pooling = self.meta.get("config", {}).get("pooling", "last")
        # The rows the side network was trained on: the device's send mode, recorded beside it.
        self.mode = self.meta.get("mode") or ("pooled" if self.pooling == "last" else "tokens")
        check_preparation(side_path, self.meta, backbone)

    def logits(self, rows: list[np.ndarray]) -> np.ndarray:
        """Head outputs [len(rows), out_dim] for token-id rows."""
        # Only the rows the side network reads are quantized: each row's last real token, or
        # (mean pooling) every real token, put back in place in a zero-padded batch under the mask.
        taps, lengths = self.bb.forward(rows, keep=self.mode)
        feeds: dict[str, np.ndarray] = {}
        if self.mode == "summary":  # two rows a sample: the last token and the tokens' mean, both real
            for name, tap in zip(self.inputs, taps):
                s = tap.spec
                values = codec.decode_arrays(tap.codes, tap.scales, s.fmt, s.hidden, s.block_size)
                feeds[name] = values.reshape(len(rows), 2, s.hidden)
            feeds[SIDE_MASK] = np.ones((len(rows), 2), np.float32)
        elif self.pooling == "last":
            for name, tap in zip(self.inputs, taps):
                s = tap.spec
                feeds[name] = codec.decode_arrays(tap.codes, tap.scales, s.fmt, s.hidden, s.block_size)[:, None, :]
            feeds[SIDE_MASK] = np.ones((len(rows), 1), np.float32)
        else:
            real = np.arange(int(lengths.max()))[None, :] < lengths[:, None]
            for name, tap in zip(self.inputs, taps):
                s = tap.spec
                values = np.zeros(real.shape + (s.hidden,), np.float32)
                values[real] = codec.decode_arrays(tap.codes, tap.scales, s.fmt, s.hidden, s.block_size)
                feeds[name] = values
            feeds[SIDE_MASK] = real.astype(np.float32)
        return self.session.run([SIDE_OUTPUT], feeds)[0]

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
