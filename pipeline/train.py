"""Stage two: stratified k-fold cross-validation of the head on cached features, temperature calibration on
the out-of-fold logits, a final fit on every labelled row, and the model directory, written whole or not at all.

    rows = open_rows(stores)           in memory, or read in blocks past cv.memory_budget_mb
    fold = assign_folds(...)           one rule for every size: stratified, groups and identical images kept whole
    fit_head(rows, train, val, ...)    one loop, one early-stopping rule
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from features.atomic import atomic_dir, check_output
from features.errors import UserError
from pipeline.folds import assign_folds
from pipeline.calibration import fit_temperature, softmax
from pipeline.head import Head, Pool, fit_head, head_logits, mean_linear_head, split_validation
from pipeline.metrics import (classification_metrics, expected_calibration_error, face_columns, per_image_metrics,
                              write_confusion, write_predictions)
from pipeline.modeldir import ModelInfo, is_model_dir, save_model_dir
from pipeline.ood import fit_ood, reference_rows, save_ood
from pipeline.params import Params
from pipeline.rows import Rows, memory_budget, open_rows


def check_model_out(out: str | Path) -> Path:
    return check_output(out, folder=True, is_ours=is_model_dir, what="model directory")


def fit_split(rows: Rows, train: np.ndarray, params: Params, random_state: int, max_val: int | None,
              pool: Pool | None = None, init: Head | None = None):
    """One head on the rows where `train` is True, as every CV fold and the final fit train it: the
    early-stopping slice carved out by train-head's rule (none below min_val_images). `init` (a linear head)
    is where a fit without a slice starts: it converges to the same optimum, in fewer iterations."""
    fit, val = split_validation(labels=rows.labels, train=train, params=params.head, random_state=random_state,
                                max_rows=max_val)
    return fit_head(rows=rows, train=fit, val=val, n_classes=len(rows.class_names), params=params.head,
                    random_state=random_state, pool=pool, init=None if val.any() else init)


def make_pool(rows: Rows, fold: np.ndarray, params: Params) -> Pool | None:
    """The labelled rows standardised once and grouped by fold, shared by a linear head's fits (in memory only;
    another copy of the labelled rows: at most the memory budget again)."""
    return Pool(rows, rows.labels >= 0, fold) if rows.in_memory and not params.head.hidden else None


def cross_validate(rows: Rows, fold: np.ndarray, params: Params, max_val: int | None,
                   on_fold=lambda: None, pool: Pool | None = None) -> tuple[np.ndarray, list[dict], Head | None]:
    """Out-of-fold logits (N, C) (rows of unlabelled images stay 0), per-fold metrics for one head config, and
    the folds' linear heads averaged (mean_linear_head: the final fit's start)."""
    names, seed = rows.class_names, params.cv.seed
    lab = rows.labels >= 0
    oof = np.zeros((len(rows), len(names)), dtype=np.float32)
    per_fold, heads = [], []
    for j in range(int(fold.max()) + 1):
        head = fit_split(rows, lab & (fold != j), params, seed + j, max_val, pool)
        te = fold == j
        z = pool.logits(head, te) if pool is not None else None  # (n_te, C) in place, or from the raw rows
        oof[te] = z if z is not None else head_logits(head, rows, te)
        m = classification_metrics(rows.labels[te], oof[te].argmax(1), names)
        per_fold.append({"fold": j, "n": m["n"], "accuracy": m["accuracy"], "macro_f1": m["macro_f1"]})
        heads.append(head)
        on_fold()
    return oof, per_fold, mean_linear_head(heads)


def prepare(stores: list[str], params: Params, intersect: bool) -> tuple[Rows, np.ndarray, int | None]:
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
    rows, fold, max_val = prepare(stores, params, intersect)
    k = int(fold.max()) + 1
    progress(f"{out}: {int((rows.labels >= 0).sum())} labelled images, {len(rows.class_names)} classes, "
             f"{rows.dim} features; cross-validating {k} folds")
    pool = make_pool(rows, fold, params)
    done = iter(range(1, k + 1))
    oof, per_fold, start = cross_validate(rows, fold, params, max_val, pool=pool,
                                          on_fold=lambda: progress(f"{out}: fold {next(done)} of {k} done"))
    progress(f"{out}: calibrating and fitting the final head on every labelled image")
    with atomic_dir(out_dir) as d:
        metrics = finish(rows, fold, oof, per_fold, params, max_val, d, t0, pool, start)
    c = metrics["cv"]
    faces = (f" ({metrics['n_faces']} face crops; per image, mean of its faces: macro-F1 "
             f"{metrics['per_image']['macro_f1']:.3f})") if "n_faces" in metrics else ""
    progress(f"{out}: {c['folds']}-fold CV on {metrics['n_images']} images{faces}: accuracy {c['accuracy_mean']:.3f} ± "
             f"{c['accuracy_std']:.3f}, macro-F1 {c['macro_f1_mean']:.3f} ± {c['macro_f1_std']:.3f}; ECE "
             f"{c['ece_before']:.3f} -> {c['ece_after']:.3f} (T={c['temperature']:.2f}) in {metrics['seconds']:.1f} s "
             f"({metrics['mode']})")
    return metrics


def finish(rows: Rows, fold: np.ndarray, oof: np.ndarray, per_fold: list[dict], params: Params,
           max_val: int | None, d: Path, t0: float, pool: Pool | None = None, start: Head | None = None) -> dict:
    """Calibrate on the out-of-fold logits, fit on every labelled row, write the model directory into `d`."""
    lab = rows.labels >= 0
    names, k, seed = rows.class_names, params.cv.folds, params.cv.seed
    final = fit_split(rows, lab, params, seed, max_val, pool, start)
    y, logits = rows.labels[lab], oof[lab]  # (n,), (n, C)
    paths = [p for p, m in zip(rows.paths, lab) if m]
    temperature = fit_temperature(logits, y)
    final.temperature = temperature
    ref, loo = fit_ood(rows.take(reference_rows(lab, seed)), final.mean, final.scale, seed)
    ood = save_ood(d, ref, loo)
    probs_raw, probs = softmax(logits), softmax(logits, temperature)
    pred = probs.argmax(1)
    overall = classification_metrics(y, pred, names)
    accs = np.array([f["accuracy"] for f in per_fold])
    f1s = np.array([f["macro_f1"] for f in per_fold])
    metrics = {
        "cv": {"folds": k, "accuracy_mean": float(accs.mean()), "accuracy_std": float(accs.std()),
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
        "mode": "in-memory" if rows.in_memory else "streamed",
        "seconds": round(time.time() - t0, 3),
    }
    info = ModelInfo(class_names=names, backbones=rows.fingerprints, backbone_weights=rows.weights_paths,
                     hidden=params.head.hidden, dim=rows.dim, dropout=params.head.dropout, temperature=temperature,
                     stores=rows.stores, image_root=rows.root, params=params.to_dict(), ood=ood)
    save_model_dir(d, final, info)
    # the run time is said on the command line, not stored: metrics.json changes only when the model does, so
    # `dvc repro` of unchanged inputs leaves git clean and `dvc metrics diff` lists what matters
    (d / "metrics.json").write_text(json.dumps({k: v for k, v in metrics.items() if k != "seconds"}, indent=2))
    np.save(d / "oof_logits.npy", logits)
    write_predictions(d / "oof_predictions.csv", paths=paths, labels=[names[i] for i in y], probs=probs,
                      class_names=names, extra={"fold": list(fold[lab]),
                                                **face_columns(rows.face_index, rows.face_boxes, lab)})
    write_confusion(d / "confusion.csv", y, pred, names)
    return metrics
