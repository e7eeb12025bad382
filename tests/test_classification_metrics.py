"""Accuracy, macro-F1 and ECE against hand-worked examples."""

import numpy as np
import pytest

from kdjax.evaluation import classification


def test_accuracy_and_macro_f1_hand_example():
    # Predictions 0 0 1 1 2 against labels 0 1 1 1 3: class 0 TP 1 FP 1 -> F1 2/3; class 1 TP 2 FN 1 -> 4/5;
    # class 2 only predicted -> 0; class 3 only a label -> 0; class 4 in neither -> left out.
    preds, labels = np.array([0, 0, 1, 1, 2]), np.array([0, 1, 1, 1, 3])
    logits = np.eye(5)[preds]
    assert classification.accuracy(logits, labels) == pytest.approx(3 / 5)
    assert classification.macro_f1(logits, labels) == pytest.approx((2 / 3 + 4 / 5 + 0 + 0) / 4)


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
