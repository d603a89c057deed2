"""Evaluate a trained head on a labelled held-out store (never seen in CV): metrics.json (headline), details.json,
predictions.csv and misclassified.csv (sorted by loss, worst first), written whole or not at all."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from features.storage.atomic import atomic_dir, check_output, holds_only
from pipeline.analysis.metrics import (classification_metrics, expected_calibration_error, per_image_metrics,
                                       write_confusion, write_metrics, write_predictions)
from pipeline.analysis.noise import bootstrap_ci
from pipeline.heads.head import softmax
from pipeline.heads.sources import sources_note
from pipeline.inference.heldout import heldout_logits
from pipeline.inference.modeldir import load_model_dir


def evaluate(*, model_dir: str, stores: list[str], out: str, progress=print) -> dict:
    out_dir = check_output(out, folder=True, is_ours=holds_only("metrics.json", "details.json", "logits.npy", "confusion.csv",
                                                                   "predictions.csv", "misclassified.csv"),
                           what="evaluation folder")
    head, info = load_model_dir(model_dir)
    names = info.class_names
    h = heldout_logits(head=head, info=info, stores=stores, model_dir=model_dir)
    paths, y, logits, faces = h.paths, h.labels, h.logits, h.faces
    t = info.temperature
    probs = softmax(logits, t)
    pred = probs.argmax(1)
    m = classification_metrics(y, pred, names)
    absent = [c for c in names if m["per_class"][c]["support"] == 0]
    test = {k: m[k] for k in ("n", "accuracy", "macro_f1", "balanced_accuracy")}
    ci = bootstrap_ci(y, pred, len(names), classes=[i for i, c in enumerate(names) if c not in absent])
    test |= {"accuracy_ci95": ci["accuracy"], "macro_f1_ci95": ci["macro_f1"]}  # over which images were drawn
    if h.trained_on:  # images the model was trained on, found in the stores: left out of everything here
        test["trained_on_left_out"] = h.trained_on
    if absent:  # a class the held-out images lack would count as F1 0: average over the classes present
        test["macro_f1_all_classes"] = m["macro_f1"]
        m["macro_f1"] = test["macro_f1"] = float(np.mean([m["per_class"][c]["f1"] for c in names if c not in absent]))
        test["classes_absent"] = absent
    metrics = {"test": test,
               "per_class": m["per_class"],
               "calibration": {"ece_uncalibrated": expected_calibration_error(softmax(logits), y),
                               "ece_calibrated": expected_calibration_error(probs, y), "temperature": t},
               # what each source's predictions rest on: its features adapted to the training statistics, so each
               # image's prediction depends on the other images of its source (heads/adapt.py)
               "adaptation": {"transform": info.adapt, "sources": {s: a.word for s, a in h.per_source.items()}}}
    if faces:  # face mode: the rows above are face crops; an image's verdict is the mean of its faces (predict's)
        metrics["per_image"] = per_image_metrics(paths, y, probs, names)
    loss = -np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, 1))
    wrong = np.flatnonzero(pred != y)
    wrong = wrong[np.argsort(-loss[wrong])]
    with atomic_dir(out_dir) as d:
        write_metrics(d, metrics, {"test": ("macro_f1", "accuracy", "n")})  # details.json: everything
        np.save(d / "logits.npy", logits)
        write_confusion(d / "confusion.csv", y, pred, names)
        write_predictions(d / "predictions.csv", paths=paths, labels=[names[i] for i in y], probs=probs,
                          class_names=names, extra={**faces, "source": h.sources, "adapted": h.adapted})
        write_predictions(d / "misclassified.csv", paths=[paths[i] for i in wrong],
                          labels=[names[y[i]] for i in wrong], probs=probs[wrong], class_names=names,
                          extra={"p_true": [f"{probs[i, y[i]]:.6f}" for i in wrong],
                                 "loss": [f"{loss[i]:.4f}" for i in wrong],
                                 **{k: [v[i] for i in wrong] for k, v in faces.items()},
                                 "source": [h.sources[i] for i in wrong], "adapted": [h.adapted[i] for i in wrong]})
    unit = (f"images ({len(y)} face crops; per image, mean of its faces: macro-F1 "
            f"{metrics['per_image']['macro_f1']:.3f})") if faces else "images"
    over = (f" over the {len(names) - len(absent)} classes present ({', '.join(absent)} absent; over all "
            f"{len(names)}: {test['macro_f1_all_classes']:.3f})") if absent else ""
    left = f" ({h.trained_note()})" if h.trained_on else ""

    def interval(k: str) -> str:
        return f"{test[k]:.3f} (95% CI {test[k + '_ci95'][0]:.3f}-{test[k + '_ci95'][1]:.3f})"
    progress(f"{out}: {len(set(paths))} held-out {unit}{left}: accuracy {interval('accuracy')}, macro-F1 "
             f"{interval('macro_f1')}{over}, {len(wrong)} misclassified (see {Path(out) / 'misclassified.csv'}); {sources_note(h.per_source)}")
    return metrics
