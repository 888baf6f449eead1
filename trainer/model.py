"""The side network (MobiLLM Eq. 5), readable top to bottom.

Taps b_1..b_M are the dequantized backbone activations (projected to the side width D when a
tap is narrower or wider, e.g. OPT-350m's last tap is 512 wide after project_out, the rest 1024):

    s_1     = b_1
    s_{m+1} = LN_m(A_m(s_m + b_{m+1}) + s_m + b_{m+1})      A_m(h) = sigma(h W_down + c) W_up + d
    logits  = head(pool(b_M + s_M))

Tap 1 seeds the state, so taps 2..M each own one adapter (and one LayerNorm). With
`adapter_per_tap` the recursion starts one step earlier, from s_0 = 0 (Eq. 5 with l from 0):
s_1 = LN_0(A_0(b_1) + b_1), so all M taps own an adapter. The taps arrive dequantized, so the
paper's Q(b_{l+1}) is b_{l+1} here. Every operation is per token: no token ever reads another,
so the head's rows can be computed from the head's rows alone (`pooled` mode, and the
gather-first path below, are exact for last-token pooling).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .config import RunConfig, SideConfig


def init_adapters_and_head(adapters, head: nn.Linear, cfg: SideConfig, g: torch.Generator) -> None:
    """The side network's initialisation (inside no_grad): W_down ~ N(0, init_std), W_up ~ N(0,
    up_init_std) (small: each adapter starts close to the identity path), head ~ N(0, 0.02), zero biases."""
    for adapter in adapters:
        nn.init.normal_(adapter.down.weight, 0.0, cfg.init_std, generator=g)
        nn.init.normal_(adapter.up.weight, 0.0, cfg.up_init_std, generator=g)
        adapter.down.bias.zero_()
        adapter.up.bias.zero_()
    nn.init.normal_(head.weight, 0.0, 0.02, generator=g)
    head.bias.zero_()


def n_adapters(n_inputs: int, cfg: SideConfig) -> int:
    """Adapters (and LayerNorms) of an Eq. 5 stack over `n_inputs` taps or slots."""
    return n_inputs if cfg.adapter_per_tap else n_inputs - 1


def adapter_stack(adapters, norms, b: list[torch.Tensor | None], adapter_per_tap: bool) -> torch.Tensor:
    """s_M of Eq. 5 over inputs b_1..b_M; a None input (an empty federated slot) is skipped.

    The state starts as b_1 (s_1 = b_1), or with `adapter_per_tap` as nothing (s_0 = 0), so b_1
    goes through the first adapter too."""
    s, rest = (None, b) if adapter_per_tap else (b[0], b[1:])
    for adapter, norm, b_next in zip(adapters, norms, rest):
        if b_next is None and s is None:
            continue
        x = b_next if s is None else s if b_next is None else s + b_next
        s = norm(adapter(x) + x)
    return s


class Adapter(nn.Module):
    """Bottleneck adapter sigma(h W_down) W_up. W_up starts near zero so the block starts as a residual."""

    def __init__(self, width: int, bottleneck: int, activation: str):
        super().__init__()
        self.down = nn.Linear(width, bottleneck)
        self.up = nn.Linear(bottleneck, width)
        self.act = nn.ReLU() if activation == "relu" else nn.GELU()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(h)))


class PerTokenSide(nn.Module):
    """Pooling and the two call forms of a side network whose `features` are strictly per token.

    Subclasses define `features(taps) -> [..., D]` and `head`; `cfg.pooling` and `cfg.tap_widths`
    say how the graph form pools and what it takes (the federated network reuses both forms)."""

    cfg: SideConfig
    head: nn.Module

    def features(self, taps: list[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def logits_from_rows(self, taps: list[torch.Tensor], lengths: torch.Tensor) -> torch.Tensor:
        """Training form: logits [n, out] from packed rows.

        `last` pooling: taps hold one row per sample (the head's row). `mean` pooling: taps hold
        every real token of every sample back to back, sample i owning lengths[i] rows.
        """
        feats = self.features(taps)
        if self.cfg.pooling == "last":
            return self.head(feats)
        owner = torch.repeat_interleave(torch.arange(len(lengths), device=feats.device), lengths)
        sums = feats.new_zeros(len(lengths), feats.shape[-1]).index_add_(0, owner, feats)
        return self.head(sums / lengths.to(feats.dtype)[:, None])

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        """Graph form (exported to ONNX): taps [B, T, H_i]..., mask [B, T] (1 = real token) -> logits [B, out]."""
        *taps, mask = inputs
        if self.cfg.pooling == "last":
            # Index of the last real token, whichever side the padding is on.
            positions = torch.arange(mask.shape[1], device=mask.device, dtype=mask.dtype)
            last = (mask * (positions + 1)).argmax(dim=1)
            rows = [t.gather(1, last[:, None, None].expand(-1, 1, t.shape[2])).squeeze(1) for t in taps]
            return self.head(self.features(rows))
        feats = self.features(list(taps))
        summed = (feats * mask[..., None]).sum(dim=1)
        return self.head(summed / mask.sum(dim=1, keepdim=True).clamp_min(1.0))


class TapStandardizer(nn.Module):
    """Per-tap, per-channel (x - mean) / spread, measured on the first `rows` training rows and then
    frozen (`--input-norm channel`). Buffers, so the checkpoint keeps them and the ONNX export bakes
    them in: the device's joint model reads taps exactly as the side network learned them."""

    def __init__(self, widths: list[int], rows: int):
        super().__init__()
        self.rows = rows
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))
        for k, w in enumerate(widths):
            self.register_buffer(f"sum{k}", torch.zeros(w, dtype=torch.float64))
            self.register_buffer(f"sumsq{k}", torch.zeros(w, dtype=torch.float64))
            self.register_buffer(f"mean{k}", torch.zeros(w))
            self.register_buffer(f"std{k}", torch.ones(w))

    @torch.no_grad()
    def _measure(self, taps: list[torch.Tensor]) -> None:
        take = min(self.rows - int(self.seen), taps[0].reshape(-1, taps[0].shape[-1]).shape[0])
        for k, t in enumerate(taps):
            rows = t.reshape(-1, t.shape[-1])[:take].double()
            s1, s2 = getattr(self, f"sum{k}").add_(rows.sum(0)), getattr(self, f"sumsq{k}").add_((rows ** 2).sum(0))
            n = float(int(self.seen) + take)
            mean = s1 / n
            std = (s2 / n - mean ** 2).clamp_min(0).sqrt()
            getattr(self, f"mean{k}").copy_(mean)
            getattr(self, f"std{k}").copy_(std.clamp_min(float(std.median()) * 1e-3 + 1e-6))
        self.seen += take

    def forward(self, taps: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.training and int(self.seen) < self.rows:
            self._measure(taps)
        return [(t - getattr(self, f"mean{k}")) / getattr(self, f"std{k}") for k, t in enumerate(taps)]


class SideNetwork(PerTokenSide):
    def __init__(self, cfg: SideConfig):
        super().__init__()
        if not cfg.tap_widths or cfg.out_dim < 1 or not cfg.side_width:
            raise ValueError("SideConfig needs tap_widths, out_dim and side_width (use SideConfig.for_taps)")
        self.cfg = cfg
        width = cfg.side_width
        self.projections = nn.ModuleList(
            [nn.Identity() if h == width else nn.Linear(h, width) for h in cfg.tap_widths])
        n = n_adapters(len(cfg.tap_widths), cfg)
        self.adapters = nn.ModuleList([Adapter(width, cfg.bottleneck, cfg.activation) for _ in range(n)])
        self.norms = nn.ModuleList([nn.LayerNorm(width, eps=cfg.ln_eps) for _ in range(n)])
        self.head = nn.Linear(width, cfg.out_dim)
        self.standardize = TapStandardizer(cfg.tap_widths, cfg.stats_rows) if cfg.input_norm == "channel" else None

    def init_weights(self, seed: int) -> None:
        """Seeded initialisation from a private generator (several runs share one process)."""
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for proj in self.projections:
                if isinstance(proj, nn.Linear):
                    nn.init.normal_(proj.weight, 0.0, proj.in_features ** -0.5, generator=g)
                    proj.bias.zero_()
            init_adapters_and_head(self.adapters, self.head, self.cfg, g)

    def features(self, taps: list[torch.Tensor]) -> torch.Tensor:
        """Per-token b_M + s_M [..., D] from taps [..., H_i] (any leading shape)."""
        if self.standardize is not None:
            taps = self.standardize(taps)
        b = [proj(t) for proj, t in zip(self.projections, taps)]
        return b[-1] + adapter_stack(self.adapters, self.norms, b, self.cfg.adapter_per_tap)


class EnsembleSide(nn.Module):
    """Side networks of one run whose logits are averaged (`--ensemble`): the same two call forms and
    graph contract as one `SideNetwork`, so the device runs the exported ensemble unchanged."""

    def __init__(self, members: list[SideNetwork]):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.cfg = members[0].cfg

    def logits_from_rows(self, taps: list[torch.Tensor], lengths: torch.Tensor) -> torch.Tensor:
        return torch.stack([m.logits_from_rows(taps, lengths) for m in self.members]).mean(0)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(*inputs) for m in self.members]).mean(0)


def member_seed(seed: int, k: int) -> int:
    """Member k's initialisation and data-order seed (member 0 keeps the run's own `seed`)."""
    return seed if k == 0 else int(np.random.SeedSequence([seed, k]).generate_state(1)[0] % (2 ** 31))


def members_from_state(cfg: RunConfig, states: list[dict], device: torch.device | str = "cpu") -> list[SideNetwork]:
    """An `--ensemble` run's members 1.. from their checkpointed state dicts."""
    members = []
    for state in states:
        member = SideNetwork(cfg.side).to(device)
        member.load_state_dict(state)
        members.append(member)
    return members


def task_loss(logits: torch.Tensor, labels: torch.Tensor, task_type: str) -> torch.Tensor:
    """Cross-entropy for classification, MSE for regression (head width 1)."""
    if task_type == "regression":
        return nn.functional.mse_loss(logits[:, 0], labels.float())
    return nn.functional.cross_entropy(logits, labels.long())


def build_side_network(cfg: SideConfig, seed: int) -> SideNetwork:
    model = SideNetwork(cfg)
    model.init_weights(seed)
    return model
