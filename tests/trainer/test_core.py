"""The training core's small units: checkpoint writing, the metric fallback, the finite check."""

import numpy as np
import pytest
import torch

from mobillm.trainer.core import CHECKPOINT, check_finite, last_epoch_scores, load_checkpoint, write_checkpoint


def test_checkpoint_is_replaced_whole(tmp_path):
    write_checkpoint(tmp_path, {"step": 1, "w": torch.ones(2)})
    write_checkpoint(tmp_path, {"step": 2, "w": torch.zeros(2)})
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT]  # no temp file left behind
    assert load_checkpoint(tmp_path)["step"] == 2


def test_metric_falls_back_by_task_type():
    outputs = np.array([[2.0, 0.0], [0.0, 1.0]], np.float32)
    assert last_epoch_scores("unknown-task", "class", 2, outputs, np.array([0, 0])) == {"last_epoch_accuracy": 0.5}
    values = np.array([[0.1], [0.5], [0.9]], np.float32)
    scores = last_epoch_scores("sst2", "regression", 1, values, np.array([0.0, 0.4, 1.0], np.float32))
    assert list(scores) == ["last_epoch_pearson"]  # sst2 is a classification preset: its metric does not apply


def test_non_finite_loss_fails_the_step():
    check_finite(0.5, 3)
    with pytest.raises(FloatingPointError, match="step 7 .device d1."):
        check_finite(float("nan"), 7, " (device d1)")
