"""What edge-run predict and eval show a person: class names, scores, values, a confusion matrix."""

import json

import numpy as np
import pytest
from helpers import write_rows, write_side

pytest.importorskip("torch", exc_type=ModuleNotFoundError)

from mobillm.common.tasks import TASKS, get_task  # noqa: E402
from mobillm.edge_runtime import cli  # noqa: E402


def jsonl(capsys) -> list[dict]:
    return [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]


def test_every_classification_preset_names_its_classes():
    for task in TASKS.values():
        if task.kind == "class":
            assert len(task.class_names) == task.num_labels and not any(n.isdigit() for n in task.class_names)
    assert get_task("sst2").class_names == ("negative", "positive")
    assert get_task("mrpc").class_names == ("not_equivalent", "equivalent")


def test_predict_prints_label_score_and_probabilities(tiny_engine, tmp_path, capsys):
    side = write_side(tiny_engine, tmp_path / "side.onnx", task="cola")  # no --task: the side's own
    assert cli.main(["predict", "--engine", str(tiny_engine), "--side", str(side), "-q", "a fine film", "bad"]) == 0
    records = jsonl(capsys)  # stdout is not a terminal here: JSONL
    assert [r["text"] for r in records] == ["a fine film", "bad"]
    for r in records:
        probs = r["probabilities"]
        assert set(probs) == {"unacceptable", "acceptable"} and abs(sum(probs.values()) - 1) < 1e-5
        assert r["label"] == max(probs, key=probs.get) and r["score"] == probs[r["label"]]
        assert r["label"] == ["unacceptable", "acceptable"][int(np.argmax(r["logits"]))]
    assert cli.main(["predict", "--engine", str(tiny_engine), "--side", str(side), "-q", "--labels", "no,yes",
                     "hi"]) == 0
    assert set(jsonl(capsys)[0]["probabilities"]) == {"no", "yes"}
    assert cli.main(["predict", "--engine", str(tiny_engine), "--side", str(side), "-q", "--labels", "a,b,c",
                     "hi"]) == 2
    assert "--labels names 3 classes; task cola has 2" in capsys.readouterr().err


def test_regression_prints_the_value(tiny_engine, tmp_path, capsys):
    side = write_side(tiny_engine, tmp_path / "side.onnx", task="stsb", out_dim=1)
    data = tmp_path / "d.tsv"
    data.write_text("sentence1\tsentence2\tscore\na man\ta person\t4.2\n")
    assert cli.main(["predict", "--engine", str(tiny_engine), "--side", str(side), "-q", "--data", str(data)]) == 0
    (r,) = jsonl(capsys)
    assert r["text"] == "a man | a person" and r["value"] == r["logits"][0] and "label" not in r


def test_table_for_a_terminal():
    records = [{"label": "positive", "score": 0.91234, "text": "great"}, {"label": "negative", "score": 0.5, "text": "meh"}]
    lines = cli.table(records, get_task("sst2")).splitlines()
    assert lines[0].split() == ["label", "score", "text"] and lines[1].split() == ["positive", "0.912", "great"]
    assert lines[1].index("0.912") == lines[2].index("0.500")  # aligned columns


def test_eval_adds_per_class_counts_and_confusion(tiny_engine, tmp_path, capsys):
    side = write_side(tiny_engine, tmp_path / "side.onnx")
    data = write_rows(tmp_path / "dev.tsv", 24, seed=2)
    assert cli.main(["eval", "--engine", str(tiny_engine), "--side", str(side), "--data", str(data), "-q"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    matrix = np.array(result["confusion"])
    assert result["labels"] == ["negative", "positive"] and matrix.sum() == result["rows"] == 24
    assert result["accuracy"] == pytest.approx(np.trace(matrix) / 24)
    assert result["per_class"]["positive"]["gold"] == int(matrix[1].sum())
    assert result["per_class"]["negative"]["predicted"] == int(matrix[:, 0].sum())
