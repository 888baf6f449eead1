"""Side networks for device-side tests: a real trainer SideNetwork exported to ONNX, with the JSON
metadata `edge-run train` writes beside it (no training run needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def write_side(engine: Path, out: Path, pooling: str = "last", task: str = "sst2", out_dim: int = 2,
               seed: int = 3) -> Path:
    """A side network for `engine`'s taps at `out` (+ out.json), with weights that matter."""
    torch = pytest.importorskip("torch")
    from mobillm.common.manifest import Manifest, manifest_digest
    from mobillm.trainer.config import SideConfig
    from mobillm.trainer.export import export_onnx
    from mobillm.trainer.model import build_side_network

    manifest = Manifest.load(engine, verify=False)
    cfg = SideConfig(pooling=pooling, bottleneck=8).for_taps([t.hidden for t in manifest.taps], out_dim)
    model = build_side_network(cfg, seed=seed).eval()
    with torch.no_grad():  # make the adapters matter, as after training
        gen = torch.Generator().manual_seed(seed)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    out.write_bytes(export_onnx(model))
    meta = {"config": cfg.to_meta(), "task": task, "num_labels": out_dim, "run": "test",
            "taps": [{"layer": t.layer, "hidden": t.hidden, "fmt": t.fmt, "block_size": t.block_size}
                     for t in manifest.taps],
            "engine": str(engine), "model_id": manifest.model_id, "engine_sha256": manifest_digest(engine)}
    out.with_suffix(".json").write_text(json.dumps(meta))
    return out
