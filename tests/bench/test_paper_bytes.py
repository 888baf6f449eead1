"""bench/paper/paper_bytes.py: the paper's scheme reproduces its Table V (~400 MB per iteration for
OPT-1.3B), and the earlier 9-tap baseline and saving ratios of docs/benchmarks.md come out of it."""

from types import SimpleNamespace

import pytest

from mobillm.bench.paper import compare_config, compare_report
from mobillm.bench.paper import paper_bytes as pb


def test_paper_scheme_reproduces_table_v():
    per_iteration = pb.paper_scheme_bytes(24, 2048, tokens=256, rows=16)
    assert per_iteration == 24 * 2048 * 256 * 16 * 2 == 402_653_184
    assert per_iteration / 1e6 == pytest.approx(pb.PAPER_TABLE_V_MB, rel=0.01)
    assert pb.paper_scheme_bytes(24, 2048, bytes_per_value=0.5) == per_iteration / 16 / 4  # per sample, 4-bit


def test_backbone_layouts_follow_the_exporter():
    bb = pb.Backbone.from_config("opt-350m")
    assert (bb.layers, bb.hidden, len(bb.taps)) == (24, 1024, 9)
    assert bb.taps[-1] == (24, 512) and bb.taps[0] == (8, 1024)  # project_out narrows the last tap
    assert pb.Backbone.from_config("opt-1.3b").taps[-1] == (24, 2048)


def test_rows_reproduce_the_figures_the_doc_measured():
    rows = {r["scheme"]: r for r in pb.baseline_rows("opt-350m")}
    nf4, fp16 = rows["mobillm's 9 taps, nf4"], rows["mobillm's 9 taps, fp16"]
    assert (round(nf4["bytes_per_sample"]), round(fp16["bytes_per_sample"])) == (1_183_777, 4_456_481)  # as before
    assert round(nf4["ratio"]) == 254 and round(fp16["ratio"]) == 957
    every = rows["paper's scheme: every layer (24 x 1024), fp16"]
    assert every["bytes_per_sample"] == 24 * 1024 * 256 * 2 and round(every["ratio"]) == 2702
    for name in pb.MEASURED_POOLED:  # the frames compute to what compare.py measured on the link
        row = pb.baseline_rows(name)[0]
        assert round(row["pooled_computed"]) == row["pooled_bytes"], name


def test_frame_bytes_extrapolate_exactly():
    bb = pb.Backbone.from_config("opt-125m")
    taps = [SimpleNamespace(fmt="nf4", hidden=w, block_size=64) for _, w in bb.taps]
    assert pb.taps_bytes(bb, 3, "tokens", "nf4") == compare_report.wire_bytes_per_sample(taps, 3, "tokens", rows=16)


def test_markdown_names_every_backbone():
    text = pb.markdown()
    assert text.count("| opt-1.3b |") == 3 and "402.7 MB per iteration" in text


def test_compare_report_quotes_the_every_layer_scheme():
    taps = [SimpleNamespace(fmt="nf4", hidden=1024, block_size=64, layer=layer) for layer in (8, 12, 16, 18, 20, 21,
                                                                                                22, 23)]
    manifest = SimpleNamespace(taps=taps + [SimpleNamespace(fmt="nf4", hidden=512, block_size=64, layer=24)],
                               num_layers=24, config={"hidden_size": 1024}, source="random-init")
    data = {"dev_rows": 100, "task": {"metric": "accuracy"}, "manifest": manifest, "train_rows": 10,
            "mean_train_tokens": 5, "mean_padded_tokens": 6}
    results = {"mobillm-pooled": {"curve": [{"t": 0, "metric": 0.5}, {"t": 10, "metric": 0.6}],
                                  "bytes_per_sample": 4657}}
    summary = compare_report.summarize(compare_config.Settings(methods=("mobillm-pooled",)), data, results)
    assert summary["bytes"]["paper_every_layer_fp16"] == 24 * 1024 * 256 * 2
    assert round(summary["bytes"]["ratio_every_layer"]) == 2702 and round(summary["bytes"]["ratio"]) == 254
    assert "every layer, padded to 256 tokens, fp16" in compare_report.markdown(summary)
