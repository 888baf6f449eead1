"""--tap-norm channel and the summary row: calibrated per-channel standardization folded into the
graph, bad calibration input refused before any model is built, and a side network never applied
to taps prepared another way."""

import json

import numpy as np
import pytest

pytest.importorskip("torch", exc_type=ModuleNotFoundError)
pytest.importorskip("transformers", exc_type=ModuleNotFoundError)

from mobillm.common.manifest import Manifest, ManifestError  # noqa: E402
from mobillm.edge_runtime.backbone import Backbone  # noqa: E402
from mobillm.edge_runtime.predict import JointModel  # noqa: E402
from mobillm.export.calibrate import load_stats  # noqa: E402
from mobillm.export.cli import main  # noqa: E402
from mobillm.export.verify import verify_engine  # noqa: E402
from mobillm.kernels import codec  # noqa: E402
from mobillm.trainer.config import SideConfig  # noqa: E402
from mobillm.trainer.export import export_onnx  # noqa: E402
from mobillm.trainer.model import build_side_network  # noqa: E402

TINY = ["--random-init", "--set", "hidden_size=64", "--set", "num_hidden_layers=4", "--set", "ffn_dim=128",
        "--set", "num_attention_heads=4", "--set", "word_embed_proj_dim=64", "--set", "max_position_embeddings=256"]


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "missing.tsv", "no such file"),
    (lambda d: (d / "empty.txt").write_text("\n\n") and d / "empty.txt", "no text rows found"),
    (lambda d: (d / "cols.tsv").write_text("a\tb\nx\ty\n") and d / "cols.tsv", "none of the columns"),
])
def test_bad_calibration_exits_2_naming_it_and_leaves_nothing(tmp_path, capsys, tokenizer_dir, make, message):
    data = tmp_path / "data"
    data.mkdir()
    path = make(data)
    status = main(["opt-125m", *TINY, "--tap-norm", "channel", "--calibration", str(path), "--tokenizer",
                   str(tokenizer_dir), "--out", str(tmp_path / "engine")])
    assert status == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and str(path.name) in err[0], err
    assert not (tmp_path / "engine").exists()


def test_named_columns_that_the_file_lacks(tmp_path, capsys, tokenizer_dir):
    data = tmp_path / "rows.tsv"
    data.write_text("sentence\tlabel\na fine film\t1\n")
    status = main(["opt-125m", *TINY, "--tap-norm", "channel", "--calibration", str(data), "--calibration-cols",
                   "text", "--tokenizer", str(tokenizer_dir), "--out", str(tmp_path / "engine")])
    assert status == 2
    assert "'text'" in capsys.readouterr().err and not (tmp_path / "engine").exists()


@pytest.fixture(scope="module")
def channel_engine(tiny_engine_factory, tmp_path_factory):
    rows = tmp_path_factory.mktemp("calib") / "calib.tsv"
    words = ["good", "bad", "dull", "fun", "great", "poor", "lovely", "boring"]
    rng = np.random.default_rng(0)
    rows.write_text("sentence\tlabel\n" + "".join(
        " ".join(rng.choice(words, rng.integers(2, 9))) + " movie \t0\n" for _ in range(64)))
    return tiny_engine_factory("nf4", tap_norm="channel", calibration=rows, calibration_rows=48)


def test_channel_engine_verifies_and_records_its_calibration(channel_engine):
    manifest = Manifest.load(channel_engine)
    assert manifest.tap_norm == "channel" and manifest.summary_row
    assert manifest.conditioning["rows"] == 48 and manifest.conditioning["calibration"] == "calib.tsv"
    assert manifest.preparation["conditioning"] == manifest.conditioning["stats_sha256"]
    stats = load_stats(channel_engine)
    assert len(stats) == 4 * len(manifest.taps) and all(np.isfinite(v).all() for v in stats.values())
    report = verify_engine(channel_engine)  # the summary rows and standardized channels, against torch
    assert report.ok, report.table()


def test_summary_rows_are_standardized_means_of_the_token_rows(channel_engine):
    bb = Backbone(channel_engine)
    rows = [bb.tokenize((t,), 64)[0] for t in ["a good and fun movie", "dull", "a poor , boring , dull movie"]]
    tokens, lengths = bb.forward(rows, keep="all", formats=None)
    summary, _ = bb.forward(rows, keep="summary")
    stats = load_stats(channel_engine)
    for k, (tok, summ) in enumerate(zip(tokens, summary)):
        s = tok.spec
        values = codec.decode_arrays(tok.codes, tok.scales, s.fmt, s.hidden, s.block_size)  # [B, T, H]
        rms = values * stats[f"tap{k}_token_std"] + stats[f"tap{k}_token_mean"]  # undo the token standardization
        real = np.arange(values.shape[1])[None, :] < lengths[:, None]
        mean = (rms * real[..., None]).sum(1) / lengths[:, None]
        want = (mean - stats[f"tap{k}_summary_mean"]) / stats[f"tap{k}_summary_std"]
        got = codec.decode_arrays(summ.codes, summ.scales, s.fmt, s.hidden, s.block_size).reshape(len(rows), 2, -1)
        assert np.allclose(got[:, 0], values[np.arange(len(rows)), lengths - 1])  # row 1: the last token
        err = np.sqrt(np.mean((got[:, 1] - want) ** 2) / np.mean(want ** 2))
        assert err < 0.25, (k, err)  # two nf4 roundings apart (the token rows', then the summary row's)


def test_a_side_network_is_never_applied_to_taps_prepared_otherwise(channel_engine, tiny_engine, tmp_path):
    manifest = Manifest.load(channel_engine)
    cfg = SideConfig(bottleneck=8, pooling="mean").for_taps([t.hidden for t in manifest.taps], 2)
    side = tmp_path / "side.onnx"
    side.write_bytes(export_onnx(build_side_network(cfg, seed=0)))
    side.with_suffix(".json").write_text(json.dumps({"config": cfg.to_meta(), "mode": "summary",
                                                     "preparation": manifest.preparation}))
    JointModel(Backbone(channel_engine), side)  # its own engine: accepted
    with pytest.raises(ManifestError) as err:
        JointModel(Backbone(tiny_engine), side)  # an engine whose taps are not standardized
    assert str(side) in str(err.value) and str(tiny_engine) in str(err.value) and "channel" in str(err.value)
