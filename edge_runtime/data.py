"""Local data: GLUE TSV, CSV, JSONL, Parquet (with pyarrow) or a saved HF `datasets` folder -> examples.

Rows stay on the device; only their labels (and sample ids) ever reach the server.
"""

from __future__ import annotations

import csv
import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from mobillm.common.errors import BadInput
from mobillm.common.options import option
from mobillm.common.tasks import TASKS, Task, get_task

csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


class DataError(BadInput, ValueError):
    """The data file cannot be used as given; the message names the file, row and fix."""


@dataclass(frozen=True)
class DataOptions:
    """Which rows to read and how their columns map onto a task (edge-run's data flags)."""

    task: str = option("sst2", f"task preset: {', '.join(TASKS)}")
    text_cols: str | None = option(None, "comma-separated text columns (default: the preset's)", metavar="COL,COL")
    label_col: str | None = option(None, "label column (default: the preset's)", metavar="COL")
    num_labels: int | None = option(None, "number of classes for a custom task (default: the preset's)")
    regression: bool = option(False, "custom task has a real-valued label")
    limit: int | None = option(None, "use only the first N rows of the data (default: all rows)", metavar="N")

    def resolve_task(self) -> Task:
        """The preset, with its columns overridden; a custom task when columns, label and classes are all given."""
        if self.text_cols and self.label_col and self.num_labels:
            return Task("custom", "regression" if self.regression else "class", self.num_labels,
                        tuple(self.text_cols.split(",")), self.label_col,
                        "pearson" if self.regression else "accuracy")
        try:
            base = get_task(self.task)
        except ValueError as exc:  # an unknown preset name is the user's to fix
            raise DataError(str(exc)) from None
        return replace(base, text_cols=tuple(self.text_cols.split(",")) if self.text_cols else base.text_cols,
                       label_col=self.label_col or base.label_col)


@dataclass(frozen=True)
class Example:
    texts: tuple[str, ...]
    label: float | int | None


def load_examples(path: Path | str, task: Task, limit: int | None = None, require_labels: bool = True) -> list[Example]:
    """Read `path` with the columns `task` names. Raises DataError on anything unusable."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    records = _read_records(path, task)
    if records:
        _check_columns(records[0], task, path, require_labels)
    examples: list[Example] = []
    for i, rec in enumerate(records):
        if limit is not None and len(examples) >= limit:
            break
        texts = tuple(_column(rec, col, path, i) for col in task.text_cols)
        label = None
        raw = _column(rec, task.label_col, path, i, required=require_labels)
        if raw not in (None, ""):
            label = _parse_label(raw, task, path, i)
        elif require_labels:
            raise DataError(f"{path}: row {i + 1} has no label in column {task.label_col!r}")
        examples.append(Example(texts, label))
    if not examples:
        raise DataError(f"{path}: no rows found; is it empty or is the header all there is?")
    return examples


def _read_records(path: Path, task: Task) -> list:
    if path.is_dir():
        try:
            import datasets  # optional: only for folders saved with `Dataset.save_to_disk`
        except ImportError:
            raise DataError(f"{path}: reading a saved datasets folder needs `pip install datasets`") from None
        try:
            return list(datasets.load_from_disk(str(path)))
        except FileNotFoundError as exc:  # a folder that `save_to_disk` did not write
            raise DataError(f"{path}: not a saved datasets folder ({exc})") from None
    try:
        return _read_file(path, task)
    except OSError as exc:
        raise DataError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except csv.Error as exc:
        raise DataError(f"{path}: not readable as {path.suffix.lstrip('.')} ({exc})") from None


def _check_columns(first, task: Task, path: Path, require_labels: bool) -> None:
    """One line naming the columns the task needs that the file lacks, and the columns it has."""
    needed = list(task.text_cols) + ([task.label_col] if require_labels else [])
    if isinstance(first, dict):
        missing = [c for c in needed if c not in first]
        have = ", ".join(map(str, first)) or "none"
    else:
        missing = [c for c in needed if not (isinstance(c, int) and 0 <= c < len(first))]
        have = f"{len(first)} unnamed columns (task {task.name} reads a header-less file by position)"
    if missing:
        raise DataError(f"{path}: no column {', '.join(repr(c) for c in missing)} for task {task.name}; columns "
                        f"found: {have}; pass --text-cols/--label-col or the --task preset that matches the file")


def _read_parquet(path: Path) -> list:
    try:
        import pyarrow.parquet as pq  # optional, as datasets: not a device dependency
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs `pip install pyarrow` (or convert it to .tsv, .csv or "
                        f".jsonl)") from None
    try:
        return pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises its own ArrowInvalid/OSError family for a bad file
        raise DataError(f"{path}: not readable as Parquet ({str(exc).splitlines()[0]})") from None


def _read_file(path: Path, task: Task) -> list:
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        return _read_parquet(path)
    with open(path, encoding="utf-8-sig", newline="") as f:
        if suffix == ".jsonl":
            out = []
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        out.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise DataError(f"{path}: line {n} is not valid JSON ({exc.msg})") from None
            return out
        if suffix in (".tsv", ".txt"):
            # GLUE files are written without quoting: a quote character is just a character.
            reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        elif suffix == ".csv":
            reader = csv.reader(f)
        else:
            raise DataError(f"{path}: unknown data format {suffix!r}; use .tsv, .csv, .jsonl, .parquet or a datasets "
                            f"folder")
        rows = list(reader)
    if not task.has_header:
        return rows
    if not rows:
        return []
    header = rows[0]
    return [dict(zip(header, r)) for r in rows[1:] if r]


def _column(rec, col, path: Path, i: int, required: bool = True):
    try:
        return rec[col]
    except (KeyError, IndexError):
        if not required:
            return None
        have = list(rec.keys()) if isinstance(rec, dict) else f"{len(rec)} columns"
        raise DataError(f"{path}: row {i + 1} has no column {col!r} (found {have}); "
                        f"pick the task preset that matches the file or pass --text-cols/--label-col") from None


def _parse_label(raw, task: Task, path: Path, i: int):
    if task.kind == "regression":
        try:
            return float(raw)
        except (TypeError, ValueError):
            raise DataError(f"{path}: row {i + 1}: regression label {raw!r} is not a number") from None
    if isinstance(raw, str) and raw in task.label_map:
        return task.label_map[raw]
    if isinstance(raw, str) and raw in task.class_names:  # a file that stores the class names ("positive")
        return task.class_names.index(raw)
    try:
        value = int(raw)
    except (TypeError, ValueError):
        raise DataError(f"{path}: row {i + 1}: label {raw!r} is not a class id of task {task.name}") from None
    if not 0 <= value < task.num_labels:
        raise DataError(f"{path}: row {i + 1}: label {value} outside 0..{task.num_labels - 1} for task {task.name}; "
                        f"is --task right for this file?")
    return value
