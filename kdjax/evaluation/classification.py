"""Classifier metrics for classic KD: accuracy, macro-F1 (scikit-learn) and expected calibration error.

Computed on host from full arrays of logits and labels (test sets are small; the logits come from a sharded
forward pass). scikit-learn has no ECE; it is written here.
"""

from __future__ import annotations

import numpy as np
from sklearn import metrics


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of examples whose arg-max class equals the label (`sklearn.metrics.accuracy_score`)."""
    return float(metrics.accuracy_score(labels, np.argmax(logits, axis=-1)))


def macro_f1(logits: np.ndarray, labels: np.ndarray) -> float:
    """Unweighted mean over classes of F1 = 2 TP / (2 TP + FP + FN) (`sklearn.metrics.f1_score`, macro).

    The classes are those present in the labels or the predictions; a class present in only one of them
    counts with F1 = 0.
    """
    return float(metrics.f1_score(labels, np.argmax(logits, axis=-1), average="macro", zero_division=0.0))


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


def classification_report(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """{"accuracy", "macro_f1", "ece"} for one model's test-set logits."""
    return {
        "accuracy": accuracy(logits, labels),
        "macro_f1": macro_f1(logits, labels),
        "ece": expected_calibration_error(logits, labels),
    }
