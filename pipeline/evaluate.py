"""Evaluate a trained head on a labelled held-out store (never seen in CV): metrics.json, confusion.csv,
predictions.csv and misclassified.csv (sorted by loss, worst first)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from features.errors import UserError
from pipeline.dataset import load_dataset
from pipeline.head import head_logits, softmax
from pipeline.metrics import classification_metrics, expected_calibration_error, write_confusion, write_predictions
from pipeline.model import load_head


def predict_stores(*, head, meta: dict, stores: list[str]) -> tuple[list[str], np.ndarray, np.ndarray, str]:
    """Labelled rows of held-out store(s) -> (paths, labels in the model's class order (N,), uncalibrated
    logits (N, C), image root). Refuses stores from other backbones or with unknown classes."""
    names = meta["class_names"]
    data = load_dataset(stores, expect=meta["backbones"], intersect=True)
    if data.class_names != names:
        # Labels are indices into the store's class list; map them by name onto the model's.
        unknown = sorted(set(data.class_names) - set(names))
        if unknown:
            raise UserError(f"{stores[0]}: class {unknown[0]!r} is not one the model knows ({', '.join(names)}); "
                            "evaluate on images of the trained classes")
        remap = np.array([names.index(c) for c in data.class_names] + [-1])
        data.labels = remap[data.labels]  # -1 stays -1 via the last entry
    lab = data.labels >= 0
    if not lab.any():
        raise UserError(f"{stores[0]}: no labelled images to evaluate on; use `imgsent predict` for unlabelled ones")
    logits = head_logits(head, data.features[lab])
    return [p for p, k in zip(data.paths, lab) if k], data.labels[lab], logits, data.root


def evaluate(*, model_dir: str, stores: list[str], out: str, progress=print) -> dict:
    head, meta = load_head(model_dir)
    names = meta["class_names"]
    paths, y, logits, _ = predict_stores(head=head, meta=meta, stores=stores)
    t = float(meta.get("temperature", 1.0))
    probs = softmax(logits, t)
    pred = probs.argmax(1)
    m = classification_metrics(y, pred, names)
    metrics = {"test": {k: m[k] for k in ("n", "accuracy", "macro_f1", "balanced_accuracy")},
               "per_class": m["per_class"],
               "calibration": {"ece_uncalibrated": expected_calibration_error(softmax(logits), y),
                               "ece_calibrated": expected_calibration_error(probs, y), "temperature": t}}
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    (d / "metrics.json").write_text(json.dumps(metrics, indent=2))
    np.save(d / "logits.npy", logits)
    write_confusion(d / "confusion.csv", y, pred, names)
    write_predictions(d / "predictions.csv", paths=paths, labels=[names[i] for i in y], probs=probs,
                      class_names=names)
    loss = -np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, 1))
    wrong = np.flatnonzero(pred != y)
    wrong = wrong[np.argsort(-loss[wrong])]
    write_predictions(d / "misclassified.csv", paths=[paths[i] for i in wrong], labels=[names[y[i]] for i in wrong],
                      probs=probs[wrong], class_names=names,
                      extra={"p_true": [f"{probs[i, y[i]]:.6f}" for i in wrong], "loss": [f"{loss[i]:.4f}" for i in wrong]})
    progress(f"{out}: {len(y)} held-out images: accuracy {m['accuracy']:.3f}, macro-F1 {m['macro_f1']:.3f}, "
             f"{len(wrong)} misclassified (see {d / 'misclassified.csv'})")
    return metrics
