"""Reading local training data: GLUE files from ../shared/data when present, and made-up files."""

import json
from pathlib import Path

import numpy as np
import pytest

from mobillm.common.tasks import get_task
from mobillm.edge_runtime.data import DataError, load_examples
from mobillm.edge_runtime.batches import plan_batches

GLUE = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "glue"


@pytest.mark.parametrize("task,folder,rows", [("sst2", "SST-2", 872), ("cola", "CoLA", 1043),
                                              ("mrpc", "MRPC", 408), ("stsb", "STS-B", 1500)])
def test_glue_dev_files(task, folder, rows):
    path = GLUE / folder / "dev.tsv"
    if not path.is_file():
        pytest.skip("shared GLUE data not present")
    ex = load_examples(path, get_task(task))
    assert len(ex) == rows
    assert all(isinstance(t, str) and t for e in ex for t in e.texts)
    spec = get_task(task)
    assert len(ex[0].texts) == len(spec.text_cols)
    if spec.kind == "regression":
        assert all(0.0 <= e.label <= 5.0 for e in ex)
    else:
        assert {e.label for e in ex} == {0, 1}


def test_quotes_are_plain_characters(tmp_path):
    f = tmp_path / "d.tsv"
    f.write_text('sentence\tlabel\n" a quoted start\t1\nplain\t0\n')
    ex = load_examples(f, get_task("sst2"))
    assert ex[0].texts == ('" a quoted start',) and ex[0].label == 1


def test_jsonl_and_csv(tmp_path):
    (tmp_path / "d.jsonl").write_text(json.dumps({"sentence": "good", "label": 1}) + "\n\n")
    assert load_examples(tmp_path / "d.jsonl", get_task("sst2"))[0].label == 1
    (tmp_path / "d.csv").write_text('sentence,label\n"good, really",1\n')
    assert load_examples(tmp_path / "d.csv", get_task("sst2"))[0].texts == ("good, really",)


@pytest.mark.parametrize("content,match", [
    ("", "no rows"),
    ("sentence\tlabel\n", "no rows"),
    ("sentence\tlabel\nfine\t7\n", "outside 0..1"),
    ("sentence\tlabel\nfine\tpositive\n", "not a class id"),
    ("text\tlabel\nfine\t1\n", "no column 'sentence'"),
])
def test_bad_data_is_a_clear_error(tmp_path, content, match):
    f = tmp_path / "d.tsv"
    f.write_text(content)
    with pytest.raises(DataError, match=match):
        load_examples(f, get_task("sst2"))


def test_missing_file_and_unknown_suffix(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_examples(tmp_path / "nope.tsv", get_task("sst2"))
    (tmp_path / "d.xls").write_text("x")
    with pytest.raises(DataError, match="unknown data format"):
        load_examples(tmp_path / "d.xls", get_task("sst2"))


def test_batches_cover_each_sample_once_per_epoch_and_bucket_lengths():
    lengths = np.random.default_rng(0).integers(3, 120, 500)
    batches = plan_batches(lengths, 16, 2, seed=3)
    flat = np.concatenate(batches)
    assert sorted(flat[:500]) == list(range(500)) and sorted(flat[500:]) == list(range(500))
    assert plan_batches(lengths, 16, 2, seed=3)[5].tolist() == batches[5].tolist()
    # Bucketing: padding inside batches is far below what random batches would need.
    padded = sum(lengths[b].max() * len(b) for b in batches) / lengths.sum() / 2
    assert padded < 1.15
