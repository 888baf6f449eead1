"""What the exporter needs to know about each decoder family: one small table entry per family.

Everything else (the tapped wrapper, the ONNX export, the codec, the manifest) is shared. A new
family (GPT-2, Llama-style) needs a row here; OPT is the one that is tested end to end.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable


@dataclass(frozen=True)
class Family:
    """How to read a family's config and feed its base model (`transformers.AutoModel`)."""

    name: str
    model_types: tuple[str, ...]  # `config.model_type` values that belong to this family
    layers_key: str  # config attribute holding the number of decoder layers
    max_length: Callable[[object], int]  # usable positions (tokens per row)
    position_ids: Callable  # attention_mask [B, T] -> position_ids the base model expects
    # Short name -> Hugging Face id; a random-init config for each ships in export/configs/NAME.json.
    short_names: dict[str, str] = field(default_factory=dict)

    def num_layers(self, config) -> int:
        return int(getattr(config, self.layers_key))


def _opt_position_ids(mask):
    # OPT's own rule: padded slots get -1, and OPTLearnedPositionalEmbedding adds its offset of 2.
    return (mask.cumsum(1) * mask - 1).long()


def _counting_position_ids(mask):
    # Positions count real tokens only, so left and right padding give the same hidden states.
    return (mask.cumsum(1) - 1).clamp(min=0).long()


OPT = Family(
    name="opt",
    model_types=("opt",),
    layers_key="num_hidden_layers",
    # OPT's position table has max_position_embeddings + 2 rows; the first 2 are the offset.
    max_length=lambda c: int(c.max_position_embeddings),
    position_ids=_opt_position_ids,
    short_names={f"opt-{size}": f"facebook/opt-{size}" for size in ("125m", "350m", "1.3b", "2.7b", "6.7b")},
)

GPT2 = Family(
    name="gpt2",
    model_types=("gpt2",),
    layers_key="n_layer",
    max_length=lambda c: int(c.n_positions),
    position_ids=_counting_position_ids,
)

LLAMA = Family(
    name="llama",
    model_types=("llama", "mistral", "qwen2"),
    layers_key="num_hidden_layers",
    max_length=lambda c: int(c.max_position_embeddings),
    position_ids=_counting_position_ids,
)

FAMILIES = (OPT, GPT2, LLAMA)
SHORT_NAMES = {short: hf_id for fam in FAMILIES for short, hf_id in fam.short_names.items()}


def family_for(model_type: str) -> Family:
    """The family whose table entry covers `config.model_type`; ValueError when none does."""
    for fam in FAMILIES:
        if model_type in fam.model_types:
            return fam
    known = ", ".join(t for fam in FAMILIES for t in fam.model_types)
    raise ValueError(f"model_type {model_type!r} has no exporter entry (known: {known}); "
                     f"add a Family row in mobillm/export/families.py")
