"""Ladder Side-Tuning (LST; Sung, Cho and Bansal, NeurIPS 2022) on any HF decoder backbone with a row
in bench/paper/baselines.py (OPT, Gemma 3): the `lst` method of bench/paper/compare.py.

    model = LadderSideTuning(build_classifier(spec).base_model, num_labels, reduction=8)
    out = model(input_ids=ids, attention_mask=mask, labels=y)   # .loss, .logits, as an HF classifier

- The backbone runs forward-only under `torch.no_grad()` (no activation is kept for backward) and
  never trains; hooks collect every layer's hidden state on the way.
- The side network is the backbone's own architecture (the same HF class, as many layers) shrunk
  to width d/r: hidden, FFN width and head dim all divided by r, the head count kept.
- Ladder: side layer i reads mu_i * l_i + (1 - mu_i) * s_{i-1}, where s_{i-1} is the previous
  side layer's output, l_i = down_i(norm_i(h_i)) rescaled to s_{i-1}'s per-token RMS, h_i is
  backbone layer i's output (the last one after the final norm, where the width is kept), down_i a
  learned linear d -> d/r and mu_i = sigmoid(alpha_i / T) with T = 0.1 and alpha_i = 0 at the
  start (LST's gate). The first side layer reads down_0(norm_0(h_0)), h_0 the embedding output.
  Two deviations, both for Gemma (measured in docs/benchmarks.md, "Why LST did not learn on Gemma"):
  norm_i is backbone layer i+1's own pre-norm (Gemma's input_layernorm; an RMS norm without
  weights for h_N), the view the backbone itself reads: Gemma's residual stream carries ~1e5
  outlier dims that a plain RMS norm turns into one huge entry and ~0.03 everywhere else; and the
  ladder enters at the side stream's own scale, because the pruned Gemma layers (post-norm scales
  copied) grow the side stream ~100x over 18 layers: a ladder at a fixed scale is drowned by the
  deep layers (its gradient went to 0).
- Head: the side network's last-token output (last non-padded position, as OPT/Gemma's sequence
  classifiers pool), up-projected d/r -> d by a learned linear, then a linear classifier (both
  initialised as HF initialises a classifier head: normal with std `initializer_range`, zero bias).
- Initialisation by structural pruning of the backbone's weights, with Li et al. 2017's filter
  criterion (the issue asks for a weight norm; the LST paper's exact importance score could not
  be checked from this machine): every kept index set is the top-k by **L1 norm**, sorted:
  residual dims (one set for all layers, so the side's residual stream is one space): the L1 norm
  of the column of every matrix that reads the residual stream (q/k/v, fc1 / gate+up), summed over
  layers; per layer, FFN neurons: L1 norm of their input row (fc1, or gate + up); per layer, head
  dims (one set for every head, so Gemma's q_norm/k_norm stay per-dim): L1 norm of the q, k and v
  rows at that dim, summed over heads. Every side tensor is the backbone tensor at those indices
  (norms, biases and OPT's learned positions included); the token embedding is not copied (the
  side network never reads tokens).
"""

from __future__ import annotations

import re

import torch
from torch import nn

GATE_TEMPERATURE = 0.1  # LST's T in mu = sigmoid(alpha / T)

# Which index set each dimension of a layer tensor is cut with, by the tensor name's ending.
# R: residual dims, F: FFN neurons, A: head dims repeated for every head, H: head dims themselves.
ROLES = {
    "q_proj.weight": "AR", "k_proj.weight": "AR", "v_proj.weight": "AR",
    "q_proj.bias": "A", "k_proj.bias": "A", "v_proj.bias": "A",
    "out_proj.weight": "RA", "o_proj.weight": "RA", "out_proj.bias": "R", "o_proj.bias": "R",
    "fc1.weight": "FR", "fc1.bias": "F", "fc2.weight": "RF", "fc2.bias": "R",
    "gate_proj.weight": "FR", "up_proj.weight": "FR", "down_proj.weight": "RF",
    "q_norm.weight": "H", "k_norm.weight": "H",
}
READS_RESIDUAL = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "fc1.weight", "gate_proj.weight",
                  "up_proj.weight")
FFN_IN = ("fc1.weight", "gate_proj.weight", "up_proj.weight")
HEAD_IN = ("q_proj.weight", "k_proj.weight", "v_proj.weight")


def _dims(config) -> tuple[int, int, int]:
    """(hidden, FFN width, head dim) of a decoder config (OPT or Llama/Gemma naming)."""
    ffn = getattr(config, "ffn_dim", None) or config.intermediate_size
    head = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.hidden_size, ffn, head


def side_config(config, reduction: int):
    """The backbone's config with hidden, FFN and head dims divided by `reduction` (heads kept)."""
    d, ffn, head = _dims(config)
    if d % reduction or ffn % reduction or head % reduction:
        raise ValueError(f"LST reduction {reduction} must divide hidden {d}, FFN {ffn} and head dim {head}")
    side = config.__class__.from_dict(config.to_dict())
    side.hidden_size = d // reduction
    if hasattr(side, "ffn_dim"):
        side.ffn_dim = ffn // reduction
        side.word_embed_proj_dim = d // reduction  # OPT: no project_in/out on the side
    else:
        side.intermediate_size = ffn // reduction
    if getattr(side, "head_dim", None):
        side.head_dim = head // reduction
    if getattr(side, "query_pre_attn_scalar", None):
        side.query_pre_attn_scalar = head // reduction  # Gemma scales scores by this ** -0.5: the side's head dim
    side.vocab_size = (config.pad_token_id or 0) + 2  # the side never embeds tokens: keep the table tiny
    return side


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores, in ascending index order."""
    return torch.topk(scores, k).indices.sort().values


def _layers(base) -> nn.ModuleList:
    return getattr(base, "decoder", base).layers


def pruned_indices(backbone, side) -> tuple[torch.Tensor, list[dict]]:
    """The kept residual dims (one set) and each layer's kept FFN neurons and head dims, by L1 norm."""
    d, ffn, head = _dims(backbone.config)
    ds, ffns, heads = _dims(side.config)
    residual = torch.zeros(d)
    per_layer = []
    for layer in _layers(backbone):
        params = dict(layer.named_parameters())
        ffn_score, head_score = torch.zeros(ffn), torch.zeros(head)
        for name, w in params.items():
            w = w.detach().float().abs()
            if name.endswith(READS_RESIDUAL):
                residual += w.sum(0)
            if name.endswith(FFN_IN):
                ffn_score += w.sum(1)
            if name.endswith(HEAD_IN):
                head_score += w.sum(1).view(-1, head).sum(0)
        per_layer.append({"F": _top(ffn_score, ffns), "H": _top(head_score, heads)})
    return _top(residual, ds), per_layer


def init_side_from_backbone(backbone, side) -> None:
    """Copy the backbone's weights, cut to the side's sizes at the L1-norm-selected indices."""
    keep_r, per_layer = pruned_indices(backbone, side)
    head = _dims(backbone.config)[2]
    src = dict(backbone.named_parameters())
    with torch.no_grad():
        for name, p in side.named_parameters():
            if "embed_tokens" in name:
                continue
            w = src[name].detach()
            layer = re.search(r"(?:^|\.)layers\.(\d+)\.", name)
            if layer:
                idx = per_layer[int(layer.group(1))]
                roles = next((r for end, r in ROLES.items() if name.endswith(end)), "R")
            else:  # final norm, OPT's learned positions [positions, d]
                idx, roles = {}, "R" if w.dim() == 1 else ".R"
            for dim, role in enumerate(roles):
                if role == "R":
                    w = w.index_select(dim, keep_r)
                elif role == "F":
                    w = w.index_select(dim, idx["F"])
                elif role == "H":
                    w = w.index_select(dim, idx["H"])
                elif role == "A":  # the same head dims in every head
                    n_heads = w.shape[dim] // head
                    rows = (torch.arange(n_heads)[:, None] * head + idx["H"][None, :]).reshape(-1)
                    w = w.index_select(dim, rows)
            if w.shape != p.shape:
                raise ValueError(f"LST init: {name} pruned to {tuple(w.shape)}, side has {tuple(p.shape)}")
            p.copy_(w)


def reading_norms(backbone) -> list:
    """How the ladder reads h_0 .. h_N: h_i (i < N) through backbone layer i's own pre-norm (Gemma's
    input_layernorm, pre-LN OPT's self_attn_layer_norm), the view that layer reads, whose learned scale
    damps the massive outlier dims; an RMS norm without weights where there is none (h_N after the
    final norm, post-LN OPT-350m)."""
    def rms(h):
        return nn.functional.rms_norm(h, h.shape[-1:])

    norms = []
    for layer in _layers(backbone):
        pre_ln = getattr(layer, "do_layer_norm_before", True)
        norm = getattr(layer, "input_layernorm", None) or (layer.self_attn_layer_norm if pre_ln else None)
        norms.append(norm if norm is not None else rms)
    return norms + [rms]


class LadderSideTuning(nn.Module):
    """A frozen backbone + a trainable ladder side network and head; called like an HF classifier."""

    def __init__(self, backbone, num_labels: int, reduction: int = 8):
        super().__init__()
        from transformers import AutoModel

        self.backbone = backbone.eval()
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        d = backbone.config.hidden_size
        side = AutoModel.from_config(side_config(backbone.config, reduction), attn_implementation="eager")
        self.side = side.to(next(backbone.parameters()).dtype)  # (OPT configs say fp16; the model is fp32)
        init_side_from_backbone(backbone, self.side)
        ds, n = self.side.config.hidden_size, len(_layers(backbone))
        self.down = nn.ModuleList(nn.Linear(d, ds) for _ in range(n + 1))
        self.alpha = nn.Parameter(torch.zeros(n))
        self.up = nn.Linear(ds, d)
        self.score = nn.Linear(d, num_labels)
        std = getattr(backbone.config, "initializer_range", 0.02)
        for head in (self.up, self.score):  # as HF inits a classifier head: the side's output is large (Gemma)
            nn.init.normal_(head.weight, std=std)
            nn.init.zeros_(head.bias)
        self.num_labels = num_labels
        self.reads = reading_norms(backbone)
        self._ladder: list[torch.Tensor] = []
        for i, layer in enumerate(_layers(self.side)):
            layer.register_forward_pre_hook(self._mixer(i), with_kwargs=True)

    def _mixer(self, i: int):
        """Pre-hook of side layer i: its input s becomes mu_i * l_{i+1} + (1 - mu_i) * s, l_{i+1} the ladder
        at s's per-token RMS (the module docstring)."""
        def hook(module, args, kwargs):
            mu = torch.sigmoid(self.alpha[i] / GATE_TEMPERATURE)
            s = args[0] if args else kwargs["hidden_states"]
            scale = s.pow(2).mean(-1, keepdim=True).sqrt()
            ladder = nn.functional.rms_norm(self._ladder[i + 1], s.shape[-1:]) * scale
            mixed = mu * ladder + (1 - mu) * s
            return ((mixed, *args[1:]), kwargs) if args else (args, dict(kwargs, hidden_states=mixed))
        return hook

    @torch.no_grad()
    def backbone_states(self, input_ids, attention_mask) -> list[torch.Tensor]:
        """h_0 (the first layer's input) .. h_N (the last layer's output after the final norm, unless the
        model then projects it to another width)."""
        states: list[torch.Tensor] = []
        layers = _layers(self.backbone)
        hooks = [layers[0].register_forward_pre_hook(lambda m, a, kw: states.append(a[0] if a else kw["hidden_states"]),
                                                     with_kwargs=True)]
        hooks += [layer.register_forward_hook(
            lambda m, a, out: states.append(out[0] if isinstance(out, tuple) else out)) for layer in layers]
        try:
            last = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        finally:
            for h in hooks:
                h.remove()
        if last.shape[-1] == states[-1].shape[-1]:  # (OPT-350m projects its output to 512: keep the raw layer's)
            states[-1] = last
        return states

    def forward(self, input_ids, attention_mask=None, labels=None):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        states = self.backbone_states(input_ids, attention_mask)
        self._ladder = [down(norm(h)) for down, norm, h in zip(self.down, self.reads, states)]
        try:
            s = self.side(inputs_embeds=self._ladder[0], attention_mask=attention_mask).last_hidden_state
        finally:
            self._ladder = []
        last = attention_mask.sum(1) - 1  # right padding: each row's last real token
        logits = self.score(self.up(s[torch.arange(s.shape[0]), last]))
        loss = None
        if labels is not None:
            loss = (nn.functional.mse_loss(logits.squeeze(-1), labels.float()) if self.num_labels == 1
                    else nn.functional.cross_entropy(logits, labels))
        return LSTOutput(loss, logits)

    def train(self, mode: bool = True):
        """Only the side network, its ladder and head change mode; the backbone stays in eval."""
        super().train(mode)
        self.backbone.eval()
        return self


class LSTOutput(tuple):
    """(loss, logits) with the attribute names an HF model output has."""

    def __new__(cls, loss, logits):
        return super().__new__(cls, (loss, logits))

    loss = property(lambda self: self[0])
    logits = property(lambda self: self[1])
