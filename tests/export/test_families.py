"""The GPT-2 and Llama-style family rows: tiny random configs exported and verified against
transformers' own forward (the OPT and Gemma 3 rows have their own tests)."""

from __future__ import annotations

import pytest

pytest.importorskip("torch", exc_type=ModuleNotFoundError)
transformers = pytest.importorskip("transformers", exc_type=ModuleNotFoundError)

from mobillm.export import families  # noqa: E402
from mobillm.export.pipeline import export_engine  # noqa: E402
from mobillm.export.verify import verify_engine  # noqa: E402

TINY = {
    "gpt2": lambda: transformers.GPT2Config(n_layer=3, n_embd=64, n_head=4, n_positions=128, vocab_size=400,
                                            bos_token_id=2, eos_token_id=2),
    "llama": lambda: transformers.LlamaConfig(num_hidden_layers=3, hidden_size=64, intermediate_size=128,
                                              num_attention_heads=4, num_key_value_heads=2, vocab_size=400,
                                              max_position_embeddings=128, bos_token_id=2, eos_token_id=2),
}


@pytest.mark.parametrize("model_type", sorted(TINY))
def test_family_row_exports_and_verifies(tmp_path, fallback_tokenizer_dir, model_type):
    checkpoint = tmp_path / "checkpoint"
    TINY[model_type]().save_pretrained(checkpoint)
    out = tmp_path / "engine"
    manifest = export_engine(str(checkpoint), out, random_init=True, tokenizer=fallback_tokenizer_dir,
                             quant="int8", progress=False, verify=True)
    assert manifest.family == families.family_for(model_type).name
    assert manifest.tap_layers == [1, 2, 3] and manifest.max_length == 128
    report = verify_engine(out)
    assert report.ok, report.table()
