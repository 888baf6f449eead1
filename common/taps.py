"""`TapSpec`: one tap, described once, from the exporter through the HELLO to the server.

The exporter writes it into manifest.json (with the graph outputs that carry the tap); the device
declares it in its HELLO and the server keeps it in each run's config.json (without them). Every
reader loads it through `schema.load`, so its rules below are checked the same way everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

from mobillm.common.schema import rule
from mobillm.kernels import codec

MAX_HIDDEN = 65536
MAX_QUANT_BLOCK = 65535  # the wire's TAP_HEADER holds a tap's block_size in 16 bits


@dataclass(frozen=True)
class TapSpec:
    """hidden_states[layer] of the decoder (`hidden` wide), quantized to `fmt` with one scale per
    `block_size` values (quantization blocks, kernels/codec.py; 0: one scale per tap tensor). Not to
    be confused with the manifest's `layer_groups`, the decoder layers between two taps."""

    layer: int = rule(min=0)  # index into HF hidden_states; the manifest checks 1..num_layers
    hidden: int = rule(min=1, max=MAX_HIDDEN)
    fmt: str = rule(choices=codec.FORMATS)
    block_size: int = rule(min=codec.PER_TENSOR, max=MAX_QUANT_BLOCK)
    # The engine graph's outputs for this tap (manifest only; None in the HELLO and a run's config).
    codes_output: str | None = rule(None, omit_none=True)
    scales_output: str | None = rule(None, omit_none=True)

    @property
    def bytes_per_token(self) -> int:
        return codec.bytes_per_row(self.fmt, self.hidden, self.block_size)

    @property
    def graph_outputs(self) -> tuple[str, str]:
        """(codes, scales): the engine graph's outputs for this tap (every manifest tap names them)."""
        if self.codes_output is None or self.scales_output is None:
            raise ValueError(f"tap at layer {self.layer} names no graph outputs (not a manifest's tap)")
        return self.codes_output, self.scales_output

    def to_meta(self) -> dict:
        """The tap as the HELLO carries it (the graph outputs are the device's own business)."""
        return {"layer": self.layer, "hidden": self.hidden, "fmt": self.fmt, "block_size": self.block_size}
