"""Export the side network to ONNX and check it against torch before anyone receives it.

The graph follows the side-network contract of `mobillm.common.messages` (what the device runs
with onnxruntime, no torch): inputs `tap0..tap{M-1}` (dequantized taps) and `mask`, output
`logits`. Pooling happens inside the graph.
"""

from __future__ import annotations

import copy
import io
import threading
import warnings
from pathlib import Path

import numpy as np
import torch

from mobillm.common.messages import SIDE_MASK, SIDE_OUTPUT, side_input_names, side_tap_name

from .model import EnsembleSide, SideNetwork, members_from_state

OPSET = 18
MAX_ABS_DIFF = 1e-3  # ORT vs torch on random inputs, fp32; larger means a broken export
_EXPORT_LOCK = threading.Lock()  # torch.onnx.export keeps global state: one export at a time per process


def export_onnx(model: SideNetwork | EnsembleSide) -> bytes:
    """The ONNX file bytes of `model` (copied to CPU, eval mode), with dynamic batch and tokens axes."""
    model = copy.deepcopy(model).float().cpu().eval()
    widths = model.cfg.tap_widths
    names = side_input_names(len(widths))
    example = tuple(torch.randn(2, 3, h) for h in widths) + (torch.ones(2, 3),)
    axes = {name: {0: "batch", 1: "tokens"} for name in names}
    axes[SIDE_OUTPUT] = {0: "batch"}
    buffer = io.BytesIO()
    with _EXPORT_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter announces its deprecation
        torch.onnx.export(model, example, buffer, input_names=names, output_names=[SIDE_OUTPUT],
                          dynamic_axes=axes, opset_version=OPSET, dynamo=False)
    return buffer.getvalue()


def random_inputs(widths: list[int], batch: int = 4, tokens: int = 7, seed: int = 0) -> dict[str, np.ndarray]:
    """Random taps and a ragged right-padded mask (every row keeps >= 1 real token)."""
    rng = np.random.default_rng(seed)
    feeds = {side_tap_name(i): (rng.standard_normal((batch, tokens, h)) * 3).astype(np.float32)
             for i, h in enumerate(widths)}
    lengths = rng.integers(1, tokens + 1, size=batch)
    lengths[0] = tokens
    feeds[SIDE_MASK] = (np.arange(tokens)[None, :] < lengths[:, None]).astype(np.float32)
    return feeds


def check_onnx(onnx_bytes: bytes, model: SideNetwork | EnsembleSide, seed: int = 0) -> float:
    """Max |ORT - torch| over random inputs; raises if above MAX_ABS_DIFF."""
    import onnxruntime as ort

    model = copy.deepcopy(model).float().cpu().eval()
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    worst = 0.0
    for batch, tokens in ((1, 1), (4, 7), (3, 12)):
        feeds = random_inputs(model.cfg.tap_widths, batch, tokens, seed)
        got = session.run([SIDE_OUTPUT], feeds)[0]
        with torch.no_grad():
            want = model(*(torch.from_numpy(feeds[n]) for n in side_input_names(len(model.cfg.tap_widths)))).numpy()
        if got.shape != want.shape:
            raise RuntimeError(f"ONNX output shape {got.shape} differs from torch {want.shape}")
        worst = max(worst, float(np.abs(got - want).max()))
    if not worst <= MAX_ABS_DIFF:
        raise RuntimeError(f"exported side network differs from torch by {worst:.3g} (limit {MAX_ABS_DIFF})")
    return worst


def reexport(folder: Path | str) -> tuple[Path, float]:
    """Rebuild a run's side network from config.json + checkpoint.pt and write side_network.onnx again."""
    from .config import RunConfig, RunFolderError, atomic_write
    from .core import CHECKPOINT, MODEL_FILE

    folder = Path(folder)
    cfg = RunConfig.load(folder)
    checkpoint = folder / CHECKPOINT
    if not checkpoint.is_file():
        raise RunFolderError(f"{checkpoint} not found; the run has not checkpointed yet")
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    model = SideNetwork(cfg.side)
    model.load_state_dict(state["model"])
    members = members_from_state(cfg, (state.get("selection") or {}).get("members") or [])
    if members:  # an --ensemble run: the ONNX averages its members, as the returned model does
        model = EnsembleSide([model, *members])
    onnx_bytes = export_onnx(model)
    diff = check_onnx(onnx_bytes, model)
    path = folder / MODEL_FILE
    atomic_write(path, onnx_bytes)
    return path, diff
