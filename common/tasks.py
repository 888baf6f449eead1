"""Task presets (GLUE and generic) and their metrics, in numpy. Both sides import this."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Task:
    """What a task reads from a data file and how it is scored.

    `text_cols`/`label_col` are header names, or integer positions for header-less files.
    `label_map` maps label strings to class ids where a file stores words (RTE, QNLI, MNLI).
    `extra_metrics` are reported beside `metric` (QQP: F1 beside accuracy, as GLUE does);
    `dev_splits` names the dev files of the GLUE folder (`<split>.tsv`), each scored on its own
    (MNLI: dev_matched and dev_mismatched; the first is the headline).
    """

    name: str
    kind: str  # "class" or "regression"
    num_labels: int
    text_cols: tuple
    label_col: str | int
    metric: str  # accuracy | f1 | matthews | pearson
    has_header: bool = True
    label_map: dict = field(default_factory=dict)
    extra_metrics: tuple[str, ...] = ()
    dev_splits: tuple[str, ...] = ("dev",)
    labels: tuple[str, ...] = ()  # class names in class-id order (what `edge-run predict` prints)

    @property
    def class_names(self) -> tuple[str, ...]:
        """Name of each class id: `labels`, else the words of `label_map`, else "0", "1", ...
        (regression: empty)."""
        if self.kind == "regression":
            return ()
        if len(self.labels) == self.num_labels:
            return tuple(self.labels)
        by_id = {v: k for k, v in self.label_map.items()}
        return tuple(by_id.get(i, str(i)) for i in range(self.num_labels))

    @property
    def out_dim(self) -> int:
        """Width of the head's output: classes, or 1 for regression."""
        return 1 if self.kind == "regression" else self.num_labels


ENTAIL = {"entailment": 0, "not_entailment": 1}
NLI3 = {"entailment": 0, "neutral": 1, "contradiction": 2}  # MNLI's gold_label words, GLUE's class order
TASKS = {
    "sst2": Task("sst2", "class", 2, ("sentence",), "label", "accuracy", labels=("negative", "positive")),
    "cola": Task("cola", "class", 2, (3,), 1, "matthews", has_header=False, labels=("unacceptable", "acceptable")),
    "mrpc": Task("mrpc", "class", 2, ("#1 String", "#2 String"), "Quality", "f1",
                 labels=("not_equivalent", "equivalent")),
    "stsb": Task("stsb", "regression", 1, ("sentence1", "sentence2"), "score", "pearson"),
    "rte": Task("rte", "class", 2, ("sentence1", "sentence2"), "label", "accuracy", label_map=ENTAIL),
    "qnli": Task("qnli", "class", 2, ("question", "sentence"), "label", "accuracy", label_map=ENTAIL),
    "qqp": Task("qqp", "class", 2, ("question1", "question2"), "is_duplicate", "accuracy", extra_metrics=("f1",),
                labels=("not_duplicate", "duplicate")),
    "mnli": Task("mnli", "class", 3, ("sentence1", "sentence2"), "gold_label", "accuracy", label_map=NLI3,
                 dev_splits=("dev_matched", "dev_mismatched")),
}


def get_task(name: str) -> Task:
    key = name.lower().replace("-", "")
    if key not in TASKS:
        raise ValueError(f"unknown task {name!r}; presets: {', '.join(TASKS)} (or use --text-cols/--label-col)")
    return TASKS[key]


def accuracy(pred: np.ndarray, gold: np.ndarray) -> float:
    return float(np.mean(np.asarray(pred) == np.asarray(gold)))


def f1_binary(pred: np.ndarray, gold: np.ndarray) -> float:
    pred, gold = np.asarray(pred), np.asarray(gold)
    tp = float(np.sum((pred == 1) & (gold == 1)))
    fp = float(np.sum((pred == 1) & (gold == 0)))
    fn = float(np.sum((pred == 0) & (gold == 1)))
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def matthews(pred: np.ndarray, gold: np.ndarray) -> float:
    pred, gold = np.asarray(pred), np.asarray(gold)
    tp = float(np.sum((pred == 1) & (gold == 1)))
    tn = float(np.sum((pred == 0) & (gold == 0)))
    fp = float(np.sum((pred == 1) & (gold == 0)))
    fn = float(np.sum((pred == 0) & (gold == 1)))
    denom = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return 0.0 if denom == 0 else float((tp * tn - fp * fn) / denom)


def pearson(pred: np.ndarray, gold: np.ndarray) -> float:
    pred, gold = np.asarray(pred, np.float64), np.asarray(gold, np.float64)
    if pred.std() == 0 or gold.std() == 0:
        return 0.0
    return float(np.corrcoef(pred, gold)[0, 1])


METRICS = {"accuracy": accuracy, "f1": f1_binary, "matthews": matthews, "pearson": pearson}


def confusion(task: Task, outputs: np.ndarray, gold: np.ndarray) -> dict:
    """Per-class counts and the confusion matrix (rows: gold class, columns: predicted), by class name."""
    names = task.class_names
    pred = np.asarray(outputs).argmax(axis=-1)
    gold = np.asarray(gold).astype(np.int64)
    matrix = np.zeros((len(names), len(names)), np.int64)
    np.add.at(matrix, (gold, pred), 1)
    return {"labels": list(names),
            "per_class": {n: {"gold": int(matrix[i].sum()), "predicted": int(matrix[:, i].sum()),
                              "correct": int(matrix[i, i])} for i, n in enumerate(names)},
            "confusion": matrix.tolist()}


def score(task: Task, outputs: np.ndarray, gold: np.ndarray) -> dict:
    """Task metric (plus accuracy for classification) from head outputs [n, out_dim]."""
    outputs = np.asarray(outputs)
    pred = outputs.reshape(-1) if task.kind == "regression" else outputs.argmax(axis=-1)
    result = {task.metric: METRICS[task.metric](pred, gold)}
    result.update({m: METRICS[m](pred, gold) for m in task.extra_metrics})
    if task.kind == "class" and task.metric != "accuracy":
        result["accuracy"] = accuracy(pred, gold)
    return result
