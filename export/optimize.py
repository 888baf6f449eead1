"""ONNX Runtime's transformer fusions on the traced graph, before the tap quantizers are spliced in.

`onnxruntime.transformers.optimizer.optimize_model` (its Python fusions only, `opt_level=0`: the
graph stays portable, ORT's own load-time optimizations still run on the device) rewrites what
its patterns recognise into contrib ops: SimplifiedLayerNormalization / SkipSimplifiedLayerNormalization
for RMSNorm + residual, FastGelu for GELU-tanh, fused attention where the pattern matches. It runs
before `onnx_codec.append_quantizers`, so the codec nodes are never seen by it and the taps stay
bit-exact with kernels/codec.py. Which optimizer model type applies is the family row's
`ort_fusions` (None: nothing of it matches that family's graph, measured; see docs/export.md).
"""

from __future__ import annotations

import sys


def fuse(model, family, config, enabled: bool, progress: bool = True):
    """(graph, record for the manifest's `ort_fusions`, or None when nothing ran).

    Graphs whose weights are still on disk (the dynamo exporter's, over 2 GB) are left as they
    are, with a one-line notice: the optimizer would have to load every weight into memory."""
    from .graph import stored_externally

    if not enabled or family.ort_fusions is None:
        return model, None
    if any(stored_externally(i) for i in model.graph.initializer):
        if progress:
            print("notice: ORT transformer fusions skipped: the weights of graphs over 2 GB stay on disk",
                  file=sys.stderr)
        return model, None
    import onnxruntime
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    from .graph import quiet_loggers

    options = FusionOptions(family.ort_fusions)
    heads = int(getattr(config, "num_attention_heads", 0) or 0)
    hidden = int(getattr(config, "hidden_size", 0) or 0)
    with quiet_loggers("", "onnxruntime.transformers"):
        optimized = optimize_model(model, model_type=family.ort_fusions, num_heads=heads, hidden_size=hidden,
                                   opt_level=0, optimization_options=options, use_gpu=False)
    counts = {op: n for op, n in optimized.get_fused_operator_statistics().items() if n}
    record = {"tool": "onnxruntime.transformers.optimizer.optimize_model", "onnxruntime": onnxruntime.__version__,
              "model_type": family.ort_fusions, "opt_level": 0, "fused": counts}
    return optimized.model, record
