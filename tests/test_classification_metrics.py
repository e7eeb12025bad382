"""Accuracy, macro-F1 and ECE against scikit-learn and a hand-worked example."""

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score

from kdjax.evaluation import classification


def test_accuracy_and_macro_f1_match_sklearn():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 6, size=500)
    logits = rng.normal(size=(500, 6)) + 2.0 * np.eye(6)[labels] * (rng.random(500) < 0.6)[:, None]
    preds = logits.argmax(-1)
    assert classification.accuracy(logits, labels) == pytest.approx(accuracy_score(labels, preds))
    assert classification.macro_f1(logits, labels, 6) == pytest.approx(f1_score(labels, preds, average="macro"))


def test_ece_hand_example():
    # Two bins used (15 bins): confidences 0.9 (2 examples, 1 correct) and 0.6 (2 examples, 2 correct).
    p = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.4, 0.6]])
    labels = np.array([0, 1, 0, 1])
    expected = 0.5 * abs(0.5 - 0.9) + 0.5 * abs(1.0 - 0.6)
    assert classification.expected_calibration_error(np.log(p), labels) == pytest.approx(expected, abs=1e-9)


def test_ece_zero_for_calibrated_and_large_for_overconfident():
    labels = np.zeros(10, int)
    sure_right = np.log(np.tile([[1 - 1e-9, 1e-9]], (10, 1)))
    assert classification.expected_calibration_error(sure_right, labels) < 1e-6
    sure_wrong = np.log(np.tile([[1e-9, 1 - 1e-9]], (10, 1)))
    assert classification.expected_calibration_error(sure_wrong, labels) == pytest.approx(1.0, abs=1e-6)
