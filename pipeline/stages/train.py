"""Stage two: stratified k-fold cross-validation of the head on cached features, temperature calibration on
the out-of-fold logits, a final fit on every labelled row, and the model directory, written whole or not at all.

    rows = open_rows(stores)           in memory, or read in blocks past cv.memory_budget_mb
    fold = assign_folds(...)           one rule for every size: stratified, groups and identical images kept whole
    choose_head(rows, fold, params)    CV of the head (hidden: auto tries two), fit_rows per fold
    finish(...)                        calibration, final fit, out-of-distribution reference, the model directory
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from features.storage.atomic import atomic_dir, check_output
from features.errors import UserError
from pipeline.data.folds import assign_folds
from pipeline.inference.calibration import fit_temperature, softmax
from pipeline.heads.fitting import AUTO_CANDIDATES, fit_rows
from pipeline.heads.head import head_logits
from pipeline.analysis.metrics import (classification_metrics, expected_calibration_error, face_columns, per_image_metrics,
                              write_confusion, write_predictions)
from pipeline.inference.modeldir import ModelInfo, is_model_dir, save_model_dir
from pipeline.inference.ood import fit_ood, reference_rows, save_ood
from pipeline.params import Params
from pipeline.data.rows import Rows, memory_budget, open_rows


def check_model_out(out: str | Path) -> Path:
    return check_output(out, folder=True, is_ours=is_model_dir, what="model directory")


def cross_validate(rows: Rows, fold: np.ndarray, params: Params, max_val: int | None,
                   on_fold=lambda: None) -> tuple[np.ndarray, list[dict]]:
    """Out-of-fold logits (N, C) (rows of unlabelled images stay 0) and per-fold metrics for one head config."""
    names, seed = rows.class_names, params.cv.seed
    lab = rows.labels >= 0
    oof = np.zeros((len(rows), len(names)), dtype=np.float32)
    per_fold = []
    for j in range(int(fold.max()) + 1):
        head = fit_rows(rows, lab & (fold != j), params.head, seed + j, max_val)
        te = fold == j
        oof[te] = head_logits(head, rows, te)
        m = classification_metrics(rows.labels[te], oof[te].argmax(1), names)
        per_fold.append({"fold": j, "n": m["n"], "accuracy": m["accuracy"], "macro_f1": m["macro_f1"]})
        on_fold()
    return oof, per_fold


def choose_head(rows: Rows, fold: np.ndarray, params: Params, max_val: int | None, on_fold=lambda: None
                ) -> tuple[Params, np.ndarray, list[dict], dict | None]:
    """Cross-validate params' head; with `hidden: auto`, each of AUTO_CANDIDATES on the same folds, keeping the
    one with the higher mean CV macro-F1 (a tie goes to the linear head: fewer parameters, faster). Returns the
    params with `hidden` resolved, its out-of-fold logits and per-fold metrics, and the choice (None unless auto)."""
    if params.head.hidden != "auto":
        return (params, *cross_validate(rows, fold, params, max_val, on_fold), None)
    tried = []
    for hidden in AUTO_CANDIDATES:
        p = dataclasses.replace(params, head=dataclasses.replace(params.head, hidden=hidden))
        oof, per_fold = cross_validate(rows, fold, p, max_val, on_fold)
        tried.append((float(np.mean([f["macro_f1"] for f in per_fold])), p, oof, per_fold))
    best = max(tried, key=lambda t: t[0])  # max keeps the first of equals: the linear head
    choice = {"chosen": list(best[1].head.hidden), "cv_macro_f1": {json.dumps(list(t[1].head.hidden)): round(t[0], 4)
                                                                   for t in tried}}
    return best[1], best[2], best[3], choice


def describe_choice(choice: dict) -> str:
    scores = ", ".join(f"hidden {k}: {v:.3f}" for k, v in choice["cv_macro_f1"].items())
    return f"hidden: auto chose {json.dumps(choice['chosen'])} by CV macro-F1 ({scores})"


def load_rows(stores: list[str], params: Params, intersect: bool) -> tuple[Rows, np.ndarray, int | None]:
    """Rows, fold per row and the early-stopping slice's row cap (streamed stores) for `params.cv`."""
    rows = open_rows(stores, memory_budget_mb=params.cv.memory_budget_mb, intersect=intersect)
    if not (rows.labels >= 0).any():
        raise UserError(f"{stores[0]}: no labelled images; extract from a folder with one sub-folder per class")
    fold = assign_folds(labels=rows.labels, groups=rows.groups, sha256=rows.sha256, k=params.cv.folds,
                        class_names=rows.class_names, random_state=params.cv.seed)
    # Streamed stores: the early-stopping slice is held in memory, so it gets a quarter of the budget.
    max_val = None if rows.in_memory else memory_budget(params.cv.memory_budget_mb) // (4 * 4 * rows.dim)
    return rows, fold, max_val


def train_head(*, stores: list[str], out: str, params: Params, intersect: bool = False, progress=print) -> dict:
    """The train stage: CV, calibration, final fit; writes head.npz, model.json, metrics.json, oof_logits.npy,
    oof_predictions.csv and confusion.csv into `out`. Returns metrics.json's content."""
    t0 = time.time()
    out_dir = check_model_out(out)
    rows, fold, max_val = load_rows(stores, params, intersect)
    k = int(fold.max()) + 1
    progress(f"{out}: {int((rows.labels >= 0).sum())} labelled images, {len(rows.class_names)} classes, "
             f"{rows.dim} features; cross-validating {k} folds")
    fits = k * (len(AUTO_CANDIDATES) if params.head.hidden == "auto" else 1)
    done = iter(range(1, fits + 1))
    params, oof, per_fold, choice = choose_head(rows, fold, params, max_val,
                                                on_fold=lambda: progress(f"{out}: fold {next(done)} of {fits} done"))
    if choice is not None:
        progress(f"{out}: {describe_choice(choice)}")
    progress(f"{out}: calibrating and fitting the final head on every labelled image")
    with atomic_dir(out_dir) as d:
        metrics = finish(rows, fold, oof, per_fold, params, max_val, d, t0, choice)
    c = metrics["cv"]
    faces = (f" ({metrics['n_faces']} face crops; per image, mean of its faces: macro-F1 "
             f"{metrics['per_image']['macro_f1']:.3f})") if "n_faces" in metrics else ""
    progress(f"{out}: {c['folds']}-fold CV on {metrics['n_images']} images{faces}: accuracy {c['accuracy_mean']:.3f} ± "
             f"{c['accuracy_std']:.3f}, macro-F1 {c['macro_f1_mean']:.3f} ± {c['macro_f1_std']:.3f}; ECE "
             f"{c['ece_before']:.3f} -> {c['ece_after']:.3f} (T={c['temperature']:.2f}) in {metrics['seconds']:.1f} s "
             f"({metrics['mode']})")
    return metrics


def finish(rows: Rows, fold: np.ndarray, oof: np.ndarray, per_fold: list[dict], params: Params,
           max_val: int | None, d: Path, t0: float, choice: dict | None = None) -> dict:
    """The model directory in `d`, from the CV's out-of-fold logits (N, C): fit the final head on every labelled
    row, calibrate it on the out-of-fold logits, fit its out-of-distribution reference, then write head.npz,
    model.json, ood.npz, metrics.json and the out-of-fold files. `params` has `hidden` resolved (choose_head);
    `choice` records what `hidden: auto` chose and why. Returns metrics.json's content (plus `seconds`)."""
    lab = rows.labels >= 0
    final = fit_rows(rows, lab, params.head, params.cv.seed, max_val)
    final.temperature = fit_temperature(oof[lab], rows.labels[lab])
    ref, loo = fit_ood(rows.take(reference_rows(lab, params.cv.seed)), final.mean, final.scale, params.cv.seed)
    ood = save_ood(d, ref, loo)
    metrics = {**cv_metrics(rows, oof, per_fold, final.temperature, params.cv.folds),
               **({} if choice is None else {"head_choice": choice}),
               "mode": "in-memory" if rows.in_memory else "streamed", "seconds": round(time.time() - t0, 3)}
    info = ModelInfo(class_names=rows.class_names, backbones=rows.fingerprints, backbone_weights=rows.weights_paths,
                     hidden=params.head.hidden, dim=rows.dim, dropout=params.head.dropout,
                     temperature=final.temperature, stores=rows.stores, image_root=rows.root,
                     params=params.to_dict(), ood=ood)
    save_model_dir(d, final, info)
    # the run time is said on the command line, not stored: metrics.json changes only when the model does, so
    # `dvc repro` of unchanged inputs leaves git clean and `dvc metrics diff` lists what matters
    (d / "metrics.json").write_text(json.dumps({k: v for k, v in metrics.items() if k != "seconds"}, indent=2))
    write_out_of_fold(d, rows, fold, oof, final.temperature)
    return metrics


def cv_metrics(rows: Rows, oof: np.ndarray, per_fold: list[dict], temperature: float, folds: int) -> dict:
    """metrics.json's scores: per-fold means and spreads, the pooled out-of-fold scores and calibration error
    before and after temperature scaling, per class; in face mode also per image (the mean of its faces)."""
    lab = rows.labels >= 0
    names, y, logits = rows.class_names, rows.labels[lab], oof[lab]  # (n,), (n, C)
    probs_raw, probs = softmax(logits), softmax(logits, temperature)
    overall = classification_metrics(y, probs.argmax(1), names)
    accs, f1s = (np.array([f[key] for f in per_fold]) for key in ("accuracy", "macro_f1"))
    paths = [p for p, m in zip(rows.paths, lab) if m]
    return {
        "cv": {"folds": folds, "accuracy_mean": float(accs.mean()), "accuracy_std": float(accs.std()),
               "macro_f1_mean": float(f1s.mean()), "macro_f1_std": float(f1s.std()),
               "oof_accuracy": overall["accuracy"], "oof_macro_f1": overall["macro_f1"],
               "oof_balanced_accuracy": overall["balanced_accuracy"],
               "ece_before": expected_calibration_error(probs_raw, y), "ece_after": expected_calibration_error(probs, y),
               "temperature": temperature, "per_fold": per_fold},
        "per_class": overall["per_class"],
        "n_images": int(lab.sum()), "n_unlabelled": int((~lab).sum()),
        **({} if rows.face_index is None else  # face mode: rows are face crops, each scored on its own...
           {"n_images": len(set(paths)), "n_faces": int(lab.sum()),
            # ...and each image by the mean of its faces' out-of-fold probabilities, as predict decides
            "per_image": per_image_metrics(paths, y, probs, names)}),
    }


def write_out_of_fold(d: Path, rows: Rows, fold: np.ndarray, oof: np.ndarray, temperature: float) -> None:
    """oof_logits.npy (n, C), oof_predictions.csv (calibrated, with the fold) and confusion.csv."""
    lab = rows.labels >= 0
    names, y, logits = rows.class_names, rows.labels[lab], oof[lab]
    probs = softmax(logits, temperature)
    np.save(d / "oof_logits.npy", logits)
    write_predictions(d / "oof_predictions.csv", paths=[p for p, m in zip(rows.paths, lab) if m],
                      labels=[names[i] for i in y], probs=probs, class_names=names,
                      extra={"fold": list(fold[lab]), **face_columns(rows.face_index, rows.face_boxes, lab)})
    write_confusion(d / "confusion.csv", y, probs.argmax(1), names)
