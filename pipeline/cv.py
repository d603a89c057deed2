"""Stage two: stratified k-fold cross-validation of the head on cached features, then a final fit on all
labelled rows, temperature calibration on the out-of-fold logits, and the model directory.

Identical images (same sha256) always fall in the same fold, and a manifest `group` column switches to
StratifiedGroupKFold, so near-copies never sit on both sides of a split.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from features.errors import UserError
from features.store import read_store
from pipeline.dataset import Dataset, load_dataset
from pipeline.head import fit_head, fit_temperature, head_logits, softmax
from pipeline.metrics import classification_metrics, expected_calibration_error, write_confusion, write_predictions
from pipeline.model import save_model
from pipeline.params import Params
from pipeline.stream import Chunks, feature_bytes, fit_head_streaming, hash_bucket, logits_streaming, memory_budget, \
    stream_stats


@dataclass
class CVResult:
    oof_logits: np.ndarray  # (N, C)
    fold: np.ndarray  # (N,) fold index of each row
    folds: list[dict]  # per-fold metrics


def make_folds(*, labels: np.ndarray, groups: list[str] | None, sha256: list[str], n_folds: int,
               class_names: list[str], random_state: int) -> np.ndarray:
    """Fold index per row. Raises a UserError naming cv.folds when the data cannot support it."""
    counts = np.bincount(labels, minlength=len(class_names))
    present = np.flatnonzero(counts)
    if len(present) < 2:
        raise UserError(f"only one class ({class_names[present[0]] if len(present) else 'none'}) has labelled images; "
                        "a classifier needs at least two class folders")
    smallest = int(present[np.argmin(counts[present])])
    if n_folds > counts[smallest]:
        raise UserError(f"params: cv.folds={n_folds} exceeds the smallest class count {counts[smallest]} "
                        f"(class '{class_names[smallest]}'); lower cv.folds to at most {counts[smallest]} or add images")
    key = groups if groups is not None else sha256
    has_dupes = len(set(key)) < len(key)
    fold = np.empty(len(labels), dtype=np.int64)
    if groups is not None or has_dupes:
        n_groups = len(set(key))
        if n_folds > n_groups:
            raise UserError(f"params: cv.folds={n_folds} exceeds the {n_groups} groups in the manifest; lower cv.folds")
        splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=random_state)
        splits = splitter.split(np.zeros(len(labels)), labels, key)
    else:
        splits = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=random_state).split(
            np.zeros(len(labels)), labels)
    for k, (_, test) in enumerate(splits):
        fold[test] = k
    return fold


def cross_validate(*, features: np.ndarray, labels: np.ndarray, fold: np.ndarray, class_names: list[str],
                   params: Params) -> CVResult:
    n_classes = len(class_names)
    oof = np.zeros((len(labels), n_classes), dtype=np.float32)
    per_fold = []
    for k in range(int(fold.max()) + 1):
        tr, te = fold != k, fold == k
        head = fit_head(features=features[tr], labels=labels[tr], n_classes=n_classes, params=params.head,
                        random_state=params.cv.seed + k)
        oof[te] = head_logits(head, features[te])
        m = classification_metrics(labels[te], oof[te].argmax(1), class_names)
        per_fold.append({"fold": k, "n": m["n"], "accuracy": m["accuracy"], "macro_f1": m["macro_f1"]})
    return CVResult(oof, fold, per_fold)


def train_head(*, stores: list[str], out: str, params: Params, intersect: bool = False, progress=print) -> dict:
    """The train stage: CV, calibration, final fit; writes head.pt, model.json, metrics.json,
    oof_predictions.csv and confusion.csv into `out`. Returns metrics.json's content."""
    t0 = time.time()
    budget = memory_budget(params.cv.memory_budget_mb)
    big = [s for s in stores if Path(s).exists() and feature_bytes(s) > budget]
    if big and len(stores) > 1:
        raise UserError(f"{big[0]}: fusing stores larger than the memory budget ({budget >> 20} MiB) is not supported; "
                        "raise cv.memory_budget_mb or train on one store")
    if big:
        data, y, paths, fold, cv, final = _streamed(stores[0], params)
        mode = "streamed"
    else:
        data = load_dataset(stores, intersect=intersect)
        lab = data.labels >= 0
        if not lab.any():
            raise UserError(f"{stores[0]}: no labelled images; extract from a folder with one sub-folder per class")
        x, y = data.features[lab], data.labels[lab]  # (N, D), (N,)
        paths = [p for p, m in zip(data.paths, lab) if m]
        sha = [s for s, m in zip(data.sha256, lab) if m]
        groups = [g for g, m in zip(data.groups, lab) if m] if data.groups else None
        fold = make_folds(labels=y, groups=groups, sha256=sha, n_folds=params.cv.folds,
                          class_names=data.class_names, random_state=params.cv.seed)
        cv = cross_validate(features=x, labels=y, fold=fold, class_names=data.class_names, params=params)
        final = fit_head(features=x, labels=y, n_classes=len(data.class_names), params=params.head,
                         random_state=params.cv.seed)
        mode = "in-memory"
    temperature = fit_temperature(cv.oof_logits, y)
    probs_raw, probs = softmax(cv.oof_logits), softmax(cv.oof_logits, temperature)
    pred = probs.argmax(1)
    final.temperature.fill_(temperature)

    overall = classification_metrics(y, pred, data.class_names)
    accs = np.array([f["accuracy"] for f in cv.folds])
    f1s = np.array([f["macro_f1"] for f in cv.folds])
    metrics = {
        "cv": {"folds": params.cv.folds, "accuracy_mean": float(accs.mean()), "accuracy_std": float(accs.std()),
               "macro_f1_mean": float(f1s.mean()), "macro_f1_std": float(f1s.std()),
               "oof_accuracy": overall["accuracy"], "oof_macro_f1": overall["macro_f1"],
               "oof_balanced_accuracy": overall["balanced_accuracy"],
               "ece_before": expected_calibration_error(probs_raw, y), "ece_after": expected_calibration_error(probs, y),
               "temperature": temperature, "per_fold": cv.folds},
        "per_class": overall["per_class"],
        "n_images": int(len(y)), "n_unlabelled": int((data.labels < 0).sum()), "mode": mode,
        "seconds": round(time.time() - t0, 3),
    }
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    save_model(d, final, class_names=data.class_names, fingerprints=data.fingerprints,
               weights_paths=data.weights_paths, params=params,
               stores=stores, temperature=temperature)
    (d / "metrics.json").write_text(json.dumps(metrics, indent=2))
    np.save(d / "oof_logits.npy", cv.oof_logits)
    write_predictions(d / "oof_predictions.csv", paths=paths, labels=[data.class_names[i] for i in y], probs=probs,
                      class_names=data.class_names, extra={"fold": list(fold)})
    write_confusion(d / "confusion.csv", y, pred, data.class_names)
    progress(f"{out}: {params.cv.folds}-fold CV on {len(y)} images: accuracy {metrics['cv']['accuracy_mean']:.3f} "
             f"± {metrics['cv']['accuracy_std']:.3f}, macro-F1 {metrics['cv']['macro_f1_mean']:.3f} "
             f"± {metrics['cv']['macro_f1_std']:.3f}; ECE {metrics['cv']['ece_before']:.3f} -> "
             f"{metrics['cv']['ece_after']:.3f} (T={temperature:.2f}) in {metrics['seconds']:.1f} s ({mode})")
    return metrics


def _streamed(store: str, params: Params):
    """CV + final fit reading the store chunk by chunk (stores larger than cv.memory_budget_mb).
    Folds come from the content hash (approximately stratified: hashes are uniform within each class)."""
    meta = read_store(store, features=False)
    labels = meta.labels
    lab = labels >= 0
    if not lab.any():
        raise UserError(f"{store}: no labelled images; extract from a folder with one sub-folder per class")
    names, k = meta.class_names, params.cv.folds
    counts = np.bincount(labels[lab], minlength=len(names))
    if len(np.flatnonzero(counts)) < 2:
        raise UserError(f"{store}: a classifier needs at least two classes with labelled images")
    fold = np.where(lab, hash_bucket(meta.sha256, k), -1)
    n_val = params.head.val_fraction * lab.sum() * (k - 1) / k
    val_slice = hash_bucket(meta.sha256, 1000, salt=1) < int(params.head.val_fraction * 1000)
    if n_val < params.head.min_val_images:
        val_slice[:] = False
    with h5py.File(store, "r") as f:
        dim = f["features"].shape[1]
    # A shuffle window of 4 chunks, copied ~3 times while training, stays within the memory budget.
    chunks = Chunks(store, rows=max(256, memory_budget(params.cv.memory_budget_mb) // (16 * 4 * dim)))
    cnt, s1, s2 = stream_stats(chunks, fold, k)

    def stats(exclude: int | None):
        keep = [j for j in range(k) if j != exclude]
        n = cnt[keep].sum()
        mean = s1[keep].sum(0) / n
        return mean, np.sqrt(np.maximum(s2[keep].sum(0) / n - mean ** 2, 0))

    oof = np.zeros((len(labels), len(names)), dtype=np.float32)
    per_fold = []
    for j in range(k):
        mean, std = stats(j)
        others = lab & (fold != j)
        head = fit_head_streaming(chunks=chunks, labels=np.maximum(labels, 0), train=others & ~val_slice,
                                  val=others & val_slice, mean=mean, std=std, n_classes=len(names),
                                  params=params.head, random_state=params.cv.seed + j)
        te = fold == j
        oof[te] = logits_streaming(chunks, head, te)
        m = classification_metrics(labels[te], oof[te].argmax(1), names)
        per_fold.append({"fold": j, "n": m["n"], "accuracy": m["accuracy"], "macro_f1": m["macro_f1"]})
    mean, std = stats(None)
    final = fit_head_streaming(chunks=chunks, labels=np.maximum(labels, 0), train=lab & ~val_slice,
                               val=lab & val_slice, mean=mean, std=std, n_classes=len(names), params=params.head,
                               random_state=params.cv.seed)
    data = Dataset(np.zeros((0, chunks.dim), np.float32), labels, meta.paths, meta.sha256, meta.groups, names,
                   [meta.fingerprint], meta.root, [meta.weights_path])
    paths = [p for p, m in zip(meta.paths, lab) if m]
    return data, labels[lab], paths, fold[lab], CVResult(oof[lab], fold[lab], per_fold), final
