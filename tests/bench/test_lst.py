"""bench/paper/lst.py: Ladder Side-Tuning on tiny random-init OPT and Gemma 3 backbones: the side network's
shapes, its pruned initialisation, only side parameters get gradients, and a toy task is learnt."""

import pytest

torch = pytest.importorskip("torch", exc_type=ModuleNotFoundError)
transformers = pytest.importorskip("transformers", exc_type=ModuleNotFoundError)

from mobillm.bench.paper.baselines import adapt  # noqa: E402 (torch first: skipped without it)
from mobillm.bench.paper.lst import LadderSideTuning, pruned_indices  # noqa: E402
from mobillm.common.sample import TINY_OPT  # noqa: E402

TINY_GEMMA = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
              "num_key_value_heads": 1, "head_dim": 32, "vocab_size": 300, "layer_types": ["sliding_attention",
              "full_attention"], "sliding_window": 16, "query_pre_attn_scalar": 32}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one torch thread (two threads on a loaded 2-core box spin ~30x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def opt_classifier(layers=2):
    torch.manual_seed(0)
    cfg = transformers.OPTConfig(**{**TINY_OPT, "num_hidden_layers": layers, "vocab_size": 300}, num_labels=2)
    return transformers.OPTForSequenceClassification(cfg)


def gemma_classifier():
    torch.manual_seed(0)
    cfg = transformers.Gemma3TextConfig(**TINY_GEMMA, num_labels=2, pad_token_id=0)
    return transformers.AutoModelForSequenceClassification.from_config(cfg, attn_implementation="eager")


def batch(n=8, t=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 300, (n, t), generator=g)
    mask = torch.ones(n, t, dtype=torch.long)
    mask[n // 2:, t - 2:] = 0  # right-padded rows
    return ids, mask


@pytest.mark.parametrize("make", [opt_classifier, gemma_classifier], ids=["opt", "gemma3"])
def test_side_shapes_pruned_init_and_only_side_grads(make):
    model, params = adapt(make(), "lst")
    assert isinstance(model, LadderSideTuning)
    side, bb = model.side, model.backbone
    assert side.config.hidden_size == bb.config.hidden_size // 8
    assert side.config.num_hidden_layers == bb.config.num_hidden_layers
    assert len(model.down) == bb.config.num_hidden_layers + 1 and model.alpha.shape == (bb.config.num_hidden_layers,)
    # the side's weights are the backbone's at the L1-selected indices
    keep_r, per_layer = pruned_indices(bb, side)
    bb_layers = getattr(bb, "decoder", bb).layers
    side_layers = getattr(side, "decoder", side).layers
    up = "fc1" if hasattr(bb_layers[0], "fc1") else "mlp.up_proj"
    w_bb, w_side = (dict(m.named_parameters())[f"{up}.weight"] for m in (bb_layers[1], side_layers[1]))
    assert torch.equal(w_side, w_bb[per_layer[1]["F"]][:, keep_r])
    ids, mask = batch()
    out = model(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1] * 4))
    assert out.logits.shape == (8, 2) and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is None for p in bb.parameters())
    assert all(not p.requires_grad for p in bb.parameters())
    side_ids = {id(p) for p in params}
    assert side_ids == {id(p) for n, p in model.named_parameters() if not n.startswith("backbone.")}
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in side.parameters())
    assert model.alpha.grad is not None and model.score.weight.grad is not None


def test_backbone_keeps_no_activations_for_backward():
    model, _ = adapt(opt_classifier(), "lst")
    states = model.backbone_states(*batch())
    assert len(states) == 3 and all(not s.requires_grad and s.grad_fn is None for s in states)


def test_loss_falls_on_a_toy_task():
    torch.manual_seed(0)
    model, params = adapt(opt_classifier(), "lst")
    ids, mask = batch(16, 6, seed=1)
    labels = (ids[:, 0] > 150).long()  # the first token decides the class
    opt = torch.optim.AdamW(params, lr=5e-3)
    model.train()
    losses = []
    for _ in range(12):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    assert not model.backbone.training


def test_reduction_must_divide_the_dims():
    with pytest.raises(ValueError, match="must divide"):
        LadderSideTuning(opt_classifier().base_model, 2, reduction=5)


def test_ladder_reads_gemmas_pre_norm_and_enters_at_the_side_streams_scale():
    """Regression (real Gemma 3 270M did not learn): the ladder reads h_i through the backbone's own
    pre-norm, and enters each side layer at the side stream's per-token RMS however large that grows
    (the pruned Gemma layers grow it ~100x; a fixed-scale ladder was drowned and its gradient went to 0)."""
    model, _ = adapt(gemma_classifier(), "lst")
    bb_layers, side_layers = model.backbone.layers, model.side.layers
    assert all(model.reads[i] is bb_layers[i].input_layernorm for i in range(len(bb_layers)))
    seen = {}
    side_layers[0].register_forward_hook(lambda m, a, out: seen.__setitem__("s", out[0] if isinstance(out, tuple) else out))
    side_layers[1].register_forward_pre_hook(  # registered after the ladder's mixer: sees the mixed input
        lambda m, a, kw: seen.__setitem__("x", a[0] if a else kw["hidden_states"]), with_kwargs=True)
    with torch.no_grad():
        model.alpha.fill_(10.0)  # mu = sigmoid(100) = 1: side layer 1 reads the ladder alone
        side_layers[0].post_feedforward_layernorm.weight.fill_(1000.0)  # a side stream grown as Gemma's grows
    ids, mask = batch()
    model(input_ids=ids, attention_mask=mask)
    stream_rms, input_rms = (seen[k].pow(2).mean(-1).sqrt() for k in ("s", "x"))
    assert stream_rms.min() > 20  # (the ladder itself comes out of down_i at RMS ~0.5)
    assert torch.allclose(input_rms, stream_rms, rtol=1e-3)
    model.alpha.data.fill_(0.0)  # mu = 0.5: the backbone's signal still reaches the side's last layer
    model.down[-1].weight.grad = None
    model(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1] * 4)).loss.backward()
    assert model.down[-1].weight.grad.abs().max() > 1e-4
