"""The federated side network: one shared body for every device, one alignment per backbone family.

Devices with different backbones tap different layers of different widths. A family (one engine:
its manifest, depth and tap layout) gets an `Alignment` that maps each of its taps to one of the
shared network's S slots by relative depth, and projects it to the shared width D:

    slot(tap)  = clamp(round(S * layer / num_layers), 1, S)      (slot k sits at depth k / S)
    b_k        = mean over the family's taps i in slot k of  W_i LN_i(tap_i) + c_i

The final layer is always tapped (the manifest requires it), so slot S is never empty. The shared
body is Eq. 5 of `model.py` run over slots instead of taps; an empty slot contributes nothing:

    s       = b_1                                   (nothing when slot 1 is empty)
    s       = LN_k(A_k(s + b_k) + s + b_k)          k = 2..S, absent terms dropped
    logits  = head(pool(b_S + s))

(`adapter_per_tap`: s starts as nothing and k runs from 1, so every slot owns an adapter.)

Every operation is per token, as in `model.py`, so pooled mode stays exact. `AlignedSide` (one
family's alignment + the shared body) has `SideNetwork`'s two call forms and ONNX contract.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass

import torch
from torch import nn

from .config import SideConfig
from .model import Adapter, PerTokenSide, adapter_stack, init_adapters_and_head, n_adapters


def slot_of(layer: int, num_layers: int, slots: int) -> int:
    """1-based slot of a tap at `layer` of a `num_layers`-deep backbone (round half up)."""
    return min(slots, max(1, math.floor(slots * layer / num_layers + 0.5)))


@dataclass(frozen=True)
class Family:
    """One backbone family as the server sees it: the engine and where its taps sit."""

    manifest_sha256: str
    model_id: str
    num_layers: int
    taps: tuple[tuple[int, int], ...]  # (layer, hidden) per tap, in tap order

    @property
    def key(self) -> str:
        """Stable id: engine digest + depth + tap layout (quantization formats do not matter)."""
        text = json.dumps([self.manifest_sha256, self.num_layers, [list(t) for t in self.taps]])
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def slots(self, n_slots: int) -> list[int]:
        return [slot_of(layer, self.num_layers, n_slots) for layer, _ in self.taps]

    def to_dict(self) -> dict:
        return {"manifest_sha256": self.manifest_sha256, "model_id": self.model_id, "num_layers": self.num_layers,
                "taps": [list(t) for t in self.taps]}

    @classmethod
    def from_dict(cls, data: dict) -> "Family":
        return cls(data["manifest_sha256"], data["model_id"], int(data["num_layers"]),
                   tuple((int(layer), int(hidden)) for layer, hidden in data["taps"]))


class Alignment(nn.Module):
    """A family's taps -> per-slot inputs b_1..b_S of the shared body (None for an empty slot)."""

    def __init__(self, family: Family, width: int, n_slots: int, ln_eps: float):
        super().__init__()
        self.family, self.n_slots = family, n_slots
        self.slot = family.slots(n_slots)
        self.norms = nn.ModuleList([nn.LayerNorm(h, eps=ln_eps) for _, h in family.taps])
        self.projections = nn.ModuleList([nn.Linear(h, width) for _, h in family.taps])

    def init_weights(self, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for proj in self.projections:
                nn.init.normal_(proj.weight, 0.0, proj.in_features ** -0.5, generator=g)
                proj.bias.zero_()

    def forward(self, taps: list[torch.Tensor]) -> list[torch.Tensor | None]:
        per_slot: list[list[torch.Tensor]] = [[] for _ in range(self.n_slots)]
        for k, norm, proj, tap in zip(self.slot, self.norms, self.projections, taps):
            per_slot[k - 1].append(proj(norm(tap)))
        return [None if not xs else xs[0] if len(xs) == 1 else sum(xs) / len(xs) for xs in per_slot]


class SharedSide(nn.Module):
    """The body every device trains: S-1 (S with adapter_per_tap) adapters with LayerNorms over the slots,
    and the head."""

    def __init__(self, cfg: SideConfig, n_slots: int):
        super().__init__()
        if cfg.out_dim < 1 or not cfg.side_width:
            raise ValueError("the shared side network needs out_dim and side_width")
        self.cfg, self.n_slots = cfg, n_slots
        width = cfg.side_width
        n = n_adapters(n_slots, cfg)
        self.adapters = nn.ModuleList([Adapter(width, cfg.bottleneck, cfg.activation) for _ in range(n)])
        self.norms = nn.ModuleList([nn.LayerNorm(width, eps=cfg.ln_eps) for _ in range(n)])
        self.head = nn.Linear(width, cfg.out_dim)

    def init_weights(self, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            init_adapters_and_head(self.adapters, self.head, self.cfg, g)

    def features(self, b: list[torch.Tensor | None]) -> torch.Tensor:
        """Per-token b_S + s [..., D] from per-slot inputs (b[-1] is never None)."""
        return b[-1] + adapter_stack(self.adapters, self.norms, b, self.cfg.adapter_per_tap)


class AlignedSide(PerTokenSide):
    """One family's view of the shared network: its alignment, then the shared body.

    Same call forms as `SideNetwork`, so `export.export_onnx`/`check_onnx` and the device's
    `JointModel` treat it as an ordinary side network with this family's tap widths."""

    def __init__(self, shared: SharedSide, alignment: Alignment):
        super().__init__()
        self.shared, self.alignment = shared, alignment
        self.cfg = dataclasses.replace(shared.cfg, tap_widths=[h for _, h in alignment.family.taps])

    @property
    def head(self) -> nn.Module:
        return self.shared.head

    def features(self, taps: list[torch.Tensor]) -> torch.Tensor:
        return self.shared.features(self.alignment(taps))


class FedSideModel(nn.Module):
    """Everything one federated run trains: the shared body and every family's alignment."""

    def __init__(self, cfg: SideConfig, n_slots: int, seed: int):
        super().__init__()
        self.cfg, self.n_slots, self.seed = cfg, n_slots, seed
        self.shared = SharedSide(cfg, n_slots)
        self.shared.init_weights(seed)
        self.alignments = nn.ModuleDict()
        self.families: dict[str, Family] = {}

    def add_family(self, family: Family) -> Alignment:
        """The new family's alignment (seeded by the run seed and the family key), registered."""
        align = Alignment(family, self.cfg.side_width, self.n_slots, self.cfg.ln_eps)
        align.init_weights(self.seed * 1_000_003 + int(family.key[:8], 16))
        self.alignments[family.key] = align.to(self.shared.head.weight.device)
        self.families[family.key] = family
        return self.alignments[family.key]

    def view(self, key: str) -> AlignedSide:
        return AlignedSide(self.shared, self.alignments[key])
