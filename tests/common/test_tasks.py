"""QQP and MNLI presets on small fixtures in the real GLUE tsv layouts (tests/common/fixtures/glue):
columns, label mapping, the metrics, and MNLI's two dev splits."""

from pathlib import Path

import numpy as np
import pytest

from mobillm.common.tasks import get_task, score
from mobillm.edge_runtime.data import DataError, load_examples
from mobillm.trainer.core import last_epoch_scores

GLUE = Path(__file__).parent / "fixtures" / "glue"


def test_qqp_reads_both_questions_and_is_duplicate():
    task = get_task("qqp")
    train = load_examples(GLUE / "QQP" / "train.tsv", task)
    assert [e.label for e in train] == [0, 1, 0, 1]
    assert train[1].texts == ("How do I control my horny emotions?", "How do you control your horniness?")
    dev = load_examples(GLUE / "QQP" / "dev.tsv", task)
    assert dev[4].texts[0] == 'What are the best books about "Harry Potter"?'  # GLUE tsv: quotes are text


def test_qqp_scores_accuracy_and_f1():
    task = get_task("QQP")
    gold = np.array([1, 0, 1, 1, 0])
    pred = np.array([1, 1, 0, 1, 0])  # tp 2, fp 1, fn 1, 3 of 5 right
    got = score(task, np.eye(2)[pred], gold)
    assert got == pytest.approx({"accuracy": 0.6, "f1": 2 * 2 / (2 * 2 + 1 + 1)})
    assert set(last_epoch_scores("qqp", "class", 2, np.eye(2)[pred], gold)) == {"last_epoch_accuracy",
                                                                                  "last_epoch_f1"}


def test_mnli_maps_the_three_text_labels_and_reads_gold_label_in_every_layout():
    task = get_task("mnli")
    assert task.num_labels == 3 and task.label_map == {"entailment": 0, "neutral": 1, "contradiction": 2}
    train = load_examples(GLUE / "MNLI" / "train.tsv", task)  # gold_label is column 12 of 12
    assert [e.label for e in train] == [1, 0, 0, 2]
    assert train[0].texts[0].startswith("Conceptually cream skimming")
    # dev files carry five annotator labels before gold_label (column 16): the gold one is read
    matched = load_examples(GLUE / "MNLI" / "dev_matched.tsv", task)
    assert [e.label for e in matched] == [1, 2, 0]  # row 1's label1 is "neutral", label2 "entailment"
    mismatched = load_examples(GLUE / "MNLI" / "dev_mismatched.tsv", task)
    assert [e.label for e in mismatched] == [2, 2, 1, 0]
    assert task.dev_splits == ("dev_matched", "dev_mismatched")
    assert all((GLUE / "MNLI" / f"{split}.tsv").is_file() for split in task.dev_splits)


def test_mnli_three_class_accuracy_and_unknown_label_word(tmp_path):
    task = get_task("mnli")
    gold = np.array([0, 1, 2, 2])
    logits = np.array([[3, 0, 0], [0, 3, 0], [3, 0, 0], [0, 0, 3]], np.float32)
    assert score(task, logits, gold) == {"accuracy": 0.75}
    bad = tmp_path / "dev_matched.tsv"
    bad.write_text("sentence1\tsentence2\tgold_label\na\tb\tmaybe\n")
    with pytest.raises(DataError, match="'maybe' is not a class id of task mnli"):
        load_examples(bad, task)
