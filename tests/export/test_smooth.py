"""Outlier migration (export/smooth.py): the fp32 function is unchanged, outliers leave the
activations, the manifest records it, and bad calibration exits 2 leaving nothing."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch", exc_type=ModuleNotFoundError)
pytest.importorskip("transformers", exc_type=ModuleNotFoundError)

from mobillm.common.sample import TINY_OPT  # noqa: E402
from mobillm.export import calibrate, cli, families, smooth  # noqa: E402

TINY_GEMMA = {"num_hidden_layers": 2, "vocab_size": 400, "hidden_size": 64, "intermediate_size": 128,
              "head_dim": 16, "num_attention_heads": 2, "num_key_value_heads": 1, "sliding_window": 4,
              "layer_types": ["sliding_attention", "full_attention"]}


class _Tok:
    """Enough of a tokenizer for calibration: bytes of the text as ids."""

    def __call__(self, text, return_tensors="pt"):
        return {"input_ids": torch.tensor([[2] + [3 + b % 390 for b in text.encode()]])}


def _model(kind: str):
    from transformers import AutoConfig, AutoModel

    torch.manual_seed(0)
    if kind == "gemma3":
        config = AutoConfig.for_model("gemma3_text", **TINY_GEMMA)
    else:
        config = AutoConfig.for_model("opt", **{k: int(v) if str(v).isdigit() else v for k, v in TINY_OPT.items()})
    model = AutoModel.from_config(config, attn_implementation="eager", dtype=torch.float32).eval()
    with torch.no_grad():  # give the norms non-trivial weights and one massive channel, as trained models have
        for name, p in model.named_parameters():
            if "norm" in name and p.dim() == 1:
                p.add_(0.3 * torch.randn_like(p))
            if "norm" in name and "weight" in name and p.dim() == 1:
                p[5] = p[5] + 40.0
    return model


def _hidden(model, ids):
    mask = torch.ones_like(ids)
    fam = families.family_for(model.config.model_type)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=fam.position_ids(mask),
                    output_hidden_states=True, use_cache=False)
    return [h.numpy() for h in out.hidden_states]


@pytest.mark.parametrize("kind", ["gemma3", "opt"])
def test_migration_leaves_the_fp32_function_unchanged_and_shrinks_outliers(kind):
    model = _model(kind)
    fam = families.family_for(model.config.model_type)
    before = copy.deepcopy(model)
    gs = smooth.groups(model, fam.name)
    texts, source = calibrate.calibration_texts(None, None, 64)
    x_before = smooth.activation_absmax(model, fam, _Tok(), texts, gs)
    record = smooth.migrate(model, fam, _Tok(), 0.5, texts, source, progress=False)
    assert record["calibration_rows"] == 64 and record["calibration"] == "built-in"
    assert any(g["migrated"] for g in record["groups"])
    ids = torch.tensor([[2, 17, 99, 45, 300, 8, 12, 77]])
    for a, b in zip(_hidden(before, ids), _hidden(model, ids)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * np.abs(a).max())
    x_after = smooth.activation_absmax(model, fam, _Tok(), texts, gs)
    ratio = lambda x: x.max() / np.median(x)  # noqa: E731
    migrated = [k for k, g in enumerate(record["groups"]) if g["migrated"]]
    assert all(ratio(x_after[k]) < ratio(x_before[k]) for k in migrated)


def test_empty_calibration_exits_2_and_leaves_nothing(tmp_path, tokenizer_dir, capsys):
    empty = tmp_path / "calib.txt"
    empty.write_text("\n   \n\t\n")
    out = tmp_path / "engine"
    argv = ["opt-125m", "--out", str(out), "--random-init", "--tokenizer", str(tokenizer_dir), "--weights", "int8",
            "--calibration", str(empty), "--quiet"]
    for k, v in TINY_OPT.items():
        argv += ["--set", f"{k}={v}"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "--calibration" in err and "no text rows" in err
    assert not out.exists() and not list(tmp_path.glob(".engine.*"))


def test_calibration_without_activations_gives_no_factors_and_says_so():
    model = _model("opt")
    with pytest.raises(smooth.CalibrationError, match="non-finite or zero factors") as err:
        smooth.migrate(model, families.family_for("opt"), _Tok(), 0.5, [], {"calibration": "empty.txt"},
                       progress=False)
    assert err.value.exit_code == 2


def test_int8_engine_records_the_migration_and_passes_verify(tiny_engine_factory):
    from mobillm.export.verify import verify_engine

    engine = tiny_engine_factory(weights="int8", smooth_alpha=0.5)
    record = json.loads((engine / "manifest.json").read_text())["weight_quant"]["smoothing"]
    assert record["method"] == "smoothquant" and record["alpha"] == 0.5 and len(record["groups"]) == 12
    assert verify_engine(engine).ok
