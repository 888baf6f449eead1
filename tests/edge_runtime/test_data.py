"""Reading local training data: GLUE files from ../shared/data when present, and made-up files."""

import json
from pathlib import Path

import numpy as np
import pytest

from mobillm.common.tasks import get_task
from mobillm.edge_runtime.data import DataError, DataOptions, load_examples
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
    ("sentence\tlabel\nfine\tgreat\n", "not a class id"),
    ("text\tlabel\nfine\t1\n", "no column 'sentence' for task sst2; columns found: text, label"),
])
def test_bad_data_is_a_clear_error(tmp_path, content, match):
    f = tmp_path / "d.tsv"
    f.write_text(content)
    with pytest.raises(DataError, match=match):
        load_examples(f, get_task("sst2"))


ROWS = [{"sentence": "a fine film", "label": 1}, {"sentence": "dull, and long", "label": 0},
        {"sentence": "said \"wow\"\tthen left", "label": 1}]


def write_formats(folder) -> dict:
    """The same rows as .tsv (text without tabs/quotes quirks), .csv, .jsonl and (with pyarrow) .parquet."""
    import csv

    files = {}
    with open(folder / "d.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["sentence", "label"])
        w.writeheader()
        w.writerows(ROWS)
    files["csv"] = folder / "d.csv"
    (folder / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    files["jsonl"] = folder / "d.jsonl"
    (folder / "d.tsv").write_text("label\tsentence\n" + "".join(f"{r['label']}\t{r['sentence'].replace(chr(9), ' ')}\n"
                                                             for r in ROWS))
    files["tsv"] = folder / "d.tsv"
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return files
    pq.write_table(pa.Table.from_pylist(ROWS), folder / "d.parquet")
    files["parquet"] = folder / "d.parquet"
    return files


def test_every_format_reads_the_same_rows(tmp_path):
    files = write_formats(tmp_path)
    want = [(r["sentence"],) for r in ROWS]
    for fmt, path in files.items():
        got = load_examples(path, get_task("sst2"))
        assert [e.label for e in got] == [1, 0, 1], fmt
        texts = [e.texts for e in got]
        assert texts == (want if fmt != "tsv" else [(t[0].replace("\t", " "),) for t in want]), fmt


def test_parquet_with_other_columns(tmp_path):
    pa = pytest.importorskip("pyarrow", exc_type=ModuleNotFoundError)
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"review": "great", "stars": "positive"}, {"review": "bad", "stars": "negative"}]),
                   tmp_path / "r.parquet")
    task = DataOptions(text_cols="review", label_col="stars").resolve_task()
    assert [(e.texts, e.label) for e in load_examples(tmp_path / "r.parquet", task)] == [(("great",), 1), (("bad",), 0)]
    with pytest.raises(DataError, match=r"no column 'sentence', 'label' for task sst2; columns found: review, stars"):
        load_examples(tmp_path / "r.parquet", get_task("sst2"))


def test_missing_column_exits_2_listing_the_columns_found(tiny_engine, tmp_path, capsys):
    from mobillm.edge_runtime import cli

    (tmp_path / "d.csv").write_text("review,stars\ngreat,1\n")
    assert cli.main(["train", "--engine", str(tiny_engine), "--data", str(tmp_path / "d.csv")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "columns found: review, stars" in err[0] and "--text-cols" in err[0]


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
