"""The paper's byte baseline, as arithmetic (issue 16): what the MobiLLM paper's scheme sends per
sample and per iteration, against what mobillm's pooled frames send.

The paper's scheme (its Table V: ~400 MB per iteration for OPT-1.3B in fp16 at 16 x 256) sends
every decoder layer's hidden state for every token of a row padded to 256 tokens, in fp16:

    bytes/iteration = layers x hidden x 256 tokens x 16 rows x 2 bytes

The second row per backbone keeps the figure docs/benchmarks.md used before: only mobillm's own
taps (9 on a 24-layer OPT), padded to 256 tokens, as BATCH frames. Pooled bytes are what
`bench/paper/compare.py` measured on the link (where a run exists) and what the same frames compute to.

    python -m mobillm.bench.paper.paper_bytes              # the markdown table docs/benchmarks.md quotes
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np

from mobillm.bench.paths import ROOT

PAPER_TOKENS, PAPER_ROWS, FP16_BYTES = 256, 16, 2
PAPER_TABLE_V_MB = 400  # MobiLLM Table V: about 400 MB per iteration, OPT-1.3B, fp16, batch 16 x 256

# Pooled bytes per sample that bench/paper/compare.py measured on the link (docs/benchmarks.md sections).
MEASURED_POOLED = {"opt-350m": (4657, "Baselines 1 (SST-2)"), "opt-125m": (2887, "Baselines 2 (synthetic)"),
                   "gemma-3-270m": (2752, "Real backbone: Gemma 3 270M")}


def paper_scheme_bytes(layers: int, hidden: int, tokens: int = PAPER_TOKENS, rows: int = 1,
                       bytes_per_value: float = FP16_BYTES) -> float:
    """Bytes the paper's scheme sends for `rows` rows: every layer's hidden state, every padded token."""
    return layers * hidden * tokens * rows * bytes_per_value


def wire_bytes_per_sample(taps, tokens: int, mode: str, fmt: str | None = None, rows: int = 16) -> float:
    """Bytes of one BATCH frame per row, every row carrying `tokens` tokens of every tap."""
    from mobillm.common import wire
    from mobillm.kernels import codec

    n = rows * tokens
    payloads = []
    for k, t in enumerate(taps):
        f = fmt or t.fmt
        if f == "fp16":
            codes, scales = np.zeros((n, t.hidden), np.float16), np.zeros((n, 0), np.float16)
        else:
            codes = np.zeros((n, codec.code_bytes(f, t.hidden)), np.uint8)
            scales = np.zeros((n, codec.n_blocks(t.hidden, t.block_size)), np.float16)
        payloads.append(wire.TapPayload(f, t.block_size, t.hidden, codes, scales, k))
    batch = wire.Batch(0, np.arange(rows, dtype=np.uint64), np.zeros(rows, np.int64),
                       np.full(rows, tokens, np.uint32), payloads, mode)
    return len(wire.batch_frame(batch)) / rows


@dataclass(frozen=True)
class Backbone:
    """A backbone's depth, width and mobillm's default taps (export-backbone's layout)."""

    name: str
    layers: int
    hidden: int
    taps: tuple  # (layer, width) per tap; the last is after the final norm (OPT-350m: project_out, 512)

    @classmethod
    def from_config(cls, name: str) -> "Backbone":
        from mobillm.export.options import resolve_taps

        config = json.loads((ROOT / "export" / "configs" / f"{name}.json").read_text())
        layers, hidden = config["num_hidden_layers"], config["hidden_size"]
        last = config.get("word_embed_proj_dim", hidden)
        tap_layers = resolve_taps(layers, None, None)[1]
        return cls(name, layers, hidden, tuple((t, last if t == layers else hidden) for t in tap_layers))


def taps_bytes(bb: Backbone, tokens: int, mode: str, fmt: str, rows: int = PAPER_ROWS, block_size: int = 64) -> float:
    """Bytes per sample of BATCH frames carrying mobillm's taps of `bb` (the doc's earlier baseline
    with tokens=256, fp16 or nf4; pooled with tokens=1)."""
    taps = [SimpleNamespace(fmt=fmt, hidden=w, block_size=block_size) for _, w in bb.taps]
    # A frame is a fixed part plus the same bytes per row: two small frames give the 16-row one
    # without building it (fp16 OPT-1.3B rows would take 150 MB).
    one, two = (wire_bytes_per_sample(taps, tokens, mode, rows=r) * r for r in (1, 2))
    return (one + (rows - 1) * (two - one)) / rows


def baseline_rows(name: str) -> list[dict]:
    """One backbone's rows: the paper's scheme (every layer, fp16) and mobillm's taps padded to 256
    (fp16, nf4), each with bytes per sample, per iteration of 16 rows and the ratio to pooled."""
    bb = Backbone.from_config(name)
    computed = taps_bytes(bb, 1, "pooled", "nf4")
    measured, where = MEASURED_POOLED.get(name, (None, None))
    pooled = measured or computed
    schemes = [(f"paper's scheme: every layer ({bb.layers} x {bb.hidden}), fp16",
                paper_scheme_bytes(bb.layers, bb.hidden)),
               (f"mobillm's {len(bb.taps)} taps, fp16", taps_bytes(bb, PAPER_TOKENS, "tokens", "fp16")),
               (f"mobillm's {len(bb.taps)} taps, nf4", taps_bytes(bb, PAPER_TOKENS, "tokens", "nf4"))]
    return [{"backbone": name, "scheme": scheme, "bytes_per_sample": b, "mb_per_iteration": b * PAPER_ROWS / 1e6,
             "pooled_bytes": pooled, "pooled_computed": computed, "pooled_source": where or "computed",
             "ratio": b / pooled} for scheme, b in schemes]


def markdown(names=("opt-1.3b", "opt-350m", "opt-125m", "gemma-3-270m")) -> str:
    lines = ["| backbone | padded to 256 tokens | bytes / sample | MB / iteration (16 rows) | pooled bytes / sample "
             "(nf4) | × pooled |", "|---|---|---|---|---|---|"]
    for name in names:
        for r in baseline_rows(name):
            pooled = (f"{r['pooled_bytes']:,.0f} measured ({r['pooled_source']})" if r["pooled_source"] != "computed"
                      else f"{r['pooled_bytes']:,.0f} computed")
            lines.append(f"| {name} | {r['scheme']} | {r['bytes_per_sample']:,.0f} | {r['mb_per_iteration']:,.1f} | "
                         f"{pooled} | **{r['ratio']:,.0f}×** |")
    paper = paper_scheme_bytes(24, 2048, rows=PAPER_ROWS) / 1e6
    lines += ["", f"OPT-1.3B, every layer, fp16, 16 × 256: {paper:,.1f} MB per iteration "
                  f"(the paper's Table V: about {PAPER_TABLE_V_MB} MB)."]
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown())
