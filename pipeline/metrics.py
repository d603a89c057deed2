"""Metrics shared by cross-validation, evaluate and report, and the CSV files DVC plots read."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, class_names: list[str]) -> dict:
    labels = list(range(len(class_names)))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    return {
        "n": int(len(y_true)),
        "accuracy": float(accuracy_score(y_true, y_pred)) if len(y_true) else 0.0,
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "balanced_accuracy": float(np.mean([r[i] for i in labels if s[i] > 0])) if len(y_true) else 0.0,
        "per_class": {c: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
                      for i, c in enumerate(class_names)},
    }


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """ECE with equal-width confidence bins: sum_b |acc_b - conf_b| * n_b / N."""
    if not len(labels):
        return 0.0
    conf = probs.max(1)
    correct = probs.argmax(1) == labels
    edges = np.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            ece += abs(correct[m].mean() - conf[m].mean()) * m.mean()
    return float(ece)


def write_predictions(path: Path, *, paths: list[str], labels: list[str] | None, probs: np.ndarray,
                      class_names: list[str], extra: dict[str, list] | None = None) -> None:
    """path,label,predicted,confidence,p_<class>... (label column only when known)."""
    pred = probs.argmax(1) if len(probs) else np.zeros(0, int)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        head = ["path"] + (["label"] if labels is not None else []) + ["predicted", "confidence"]
        head += list(extra or {}) + [f"p_{c}" for c in class_names]
        w.writerow(head)
        for i, p in enumerate(paths):
            row = [p] + ([labels[i]] if labels is not None else []) + [class_names[pred[i]], f"{probs[i].max():.6f}"]
            row += [v[i] for v in (extra or {}).values()] + [f"{q:.6f}" for q in probs[i]]
            w.writerow(row)


def write_confusion(path: Path, y_true: np.ndarray, y_pred: np.ndarray, class_names: list[str]) -> None:
    """One row per image (actual, predicted): the input DVC's confusion template expects."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["actual", "predicted"])
        for t, p in zip(y_true, y_pred):
            w.writerow([class_names[t], class_names[p]])
