"""How a device's run is cut into batches and what each batch carries on the wire.

`plan_batches` fixes the run's order of rows (training and `predict`/`eval` share it),
`build_batch` turns the backbone's quantized taps into a wire batch, and `fixed_formats` reads a
fixed `--bits` value. Pure functions: no I/O, no threads.
"""

from __future__ import annotations

import numpy as np

from mobillm.common import wire
from mobillm.common.errors import BadInput
from mobillm.kernels import codec

from .backbone import TapOutput
from .bitplan import AUTO_CHOICES, auto_rule


def plan_batches(lengths: np.ndarray, batch_size: int, epochs: int, seed: int) -> list[np.ndarray]:
    """The run's batches, deterministic in `seed`: shuffled per epoch, then length-bucketed
    within windows of 16 batches so rows in a batch have similar lengths (less padding).

    The batches of a window are then sent in random order, not shortest first: a sweep of one
    length after another let the side network drift towards the lengths it saw last, and the
    loss jumped when short rows came back (docs/benchmarks.md, "Training recipe")."""
    batches = []
    window = batch_size * 16
    for epoch in range(epochs):
        rng = np.random.default_rng([seed, epoch])
        order = rng.permutation(len(lengths))
        for start in range(0, len(order), window):
            chunk = order[start:start + window]
            chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
            bucketed = [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
            batches += [bucketed[i] for i in rng.permutation(len(bucketed))]
    return batches


def build_batch(seq: int, ids: np.ndarray, labels: np.ndarray, taps: list[TapOutput], lengths: np.ndarray,
                mode: str, plan: list[str] | None) -> wire.Batch:
    """The wire batch of taps already cut to the rows `mode` sends (`Backbone.forward(rows, keep=mode)`)."""
    payloads = []
    for k, tap in enumerate(taps):
        codes, scales = tap.codes, tap.scales
        spec = tap.spec
        fmt = spec.fmt
        if plan is not None and plan[k] != spec.fmt:
            # Re-quantize to the planned format from the graph's own output (best from fp16 engines).
            values = codec.decode_arrays(codes, scales, spec.fmt, spec.hidden, spec.block_size)
            enc = codec.encode(values, plan[k], spec.block_size, name=f"tap {k}")
            codes, scales, fmt = enc.codes, enc.scales, plan[k]
        payloads.append(wire.TapPayload(fmt, spec.block_size, spec.hidden, codes, scales, k))
    per_sample = wire.ROWS_PER_SAMPLE.get(mode)
    out_lengths = np.full(len(lengths), per_sample, np.uint32) if per_sample else lengths.astype(np.uint32)
    return wire.Batch(seq, ids.astype(np.uint64), labels, out_lengths, payloads, mode)


def fixed_formats(bits: str, n_taps: int) -> list[str] | None:
    """The per-tap formats a fixed `--bits` asks for (one format for every tap, or one per tap);
    None for `engine` and `auto[:RULE]`. A value the engine cannot send is BadInput."""
    try:
        if bits == "engine" or auto_rule(bits):
            return None
        fmts = [codec.check_format(f) for f in bits.split(",")]
    except ValueError as exc:
        rule_error = bits.startswith("auto:")  # its message lists the rules already
        raise BadInput(f"--bits {bits}: {exc}" + ("" if rule_error else f"; or engine, {', '.join(AUTO_CHOICES)}")) \
            from None
    if len(fmts) not in (1, n_taps):
        raise BadInput(f"--bits {bits}: {len(fmts)} formats for an engine with {n_taps} taps (give 1 or {n_taps})")
    return fmts * n_taps if len(fmts) == 1 else fmts
