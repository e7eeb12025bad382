"""Classifier metrics for classic KD: accuracy, macro-F1 and expected calibration error.

Computed on host with numpy from full arrays of logits and labels (test sets are small; the logits
come from a sharded forward pass).
"""

from __future__ import annotations

import numpy as np


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of examples whose arg-max class equals the label."""
    return float(np.mean(np.argmax(logits, axis=-1) == labels))


def macro_f1(logits: np.ndarray, labels: np.ndarray, num_classes: int | None = None) -> float:
    """Unweighted mean over classes of F1 = 2 TP / (2 TP + FP + FN).

    Classes that never occur in either labels or predictions are left out of the mean (as in
    scikit-learn's `f1_score(average="macro")` with the labels present); a class that occurs only in one
    of them counts with F1 = 0.
    """
    preds = np.argmax(logits, axis=-1)
    num_classes = num_classes or int(max(preds.max(), labels.max()) + 1)
    f1s = []
    for c in range(num_classes):
        tp = np.sum((preds == c) & (labels == c))
        fp = np.sum((preds == c) & (labels != c))
        fn = np.sum((preds != c) & (labels == c))
        if tp + fp + fn == 0:
            continue
        f1s.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(f1s))


def expected_calibration_error(logits: np.ndarray, labels: np.ndarray, num_bins: int = 15) -> float:
    """ECE (Guo et al. 2017): sum_m |B_m|/n * |acc(B_m) - conf(B_m)| over equal-width confidence bins.

    Confidence is the maximum softmax probability; bins are (m/M, (m+1)/M], the first one closed at 0.
    """
    z = logits - logits.max(axis=-1, keepdims=True)
    probs = np.exp(z) / np.exp(z).sum(axis=-1, keepdims=True)
    conf = probs.max(axis=-1)
    correct = (probs.argmax(axis=-1) == labels).astype(np.float64)
    bins = np.clip(np.ceil(conf * num_bins).astype(int) - 1, 0, num_bins - 1)
    ece = 0.0
    for m in range(num_bins):
        in_bin = bins == m
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - conf[in_bin].mean())
    return float(ece)


def classification_report(logits: np.ndarray, labels: np.ndarray, num_classes: int) -> dict[str, float]:
    """{"accuracy", "macro_f1", "ece"} for one model's test-set logits."""
    return {
        "accuracy": accuracy(logits, labels),
        "macro_f1": macro_f1(logits, labels, num_classes),
        "ece": expected_calibration_error(logits, labels),
    }
