"""What to do next, from the cached features and the out-of-fold predictions of a model directory:

    label_issues(...)     which labels look wrong, with the label the model suggests (confident learning, cleanlab)
    learning_curve(...)   macro-F1 under the same CV with each class cut to 2, 5, 10, 20, ... training images:
                          will more labels help?
    embedding_2d(...)     a 2-D map of the training features (PCA of the standardised features)
    near_duplicates(...)  pairs of near-identical images that CV put in different folds
"""
from __future__ import annotations

import numpy as np

from pipeline.analysis.noise import t975
from pipeline.data.folds import cv_sources
from pipeline.heads.sources import rows_logits
from pipeline.analysis.metrics import classification_metrics
from pipeline.params import Params
from pipeline.data.rows import Rows
from pipeline.heads.fitting import fit_rows

SIZES = (2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)


def label_issues(*, labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows whose given label is likely wrong, worst first: (row indices, suggested class, score = normalised
    margin, p(given label) - max p(other class), in [-1, 1], lower is worse). Confident learning (Northcutt et al.
    2021) as cleanlab implements it: a row is an issue when the model's per-class confidence thresholds put it in
    another class more surely than the estimated noise rates allow.

    Ranked by the margin rather than by p(given label) alone: the list exists to be fixed with the suggested
    label, so rows where one other class clearly wins come first, ahead of rows the model finds merely hard.
    Measured on 5 planted errors in the shared emoji (6 seeds): planted rows in the top 10 with their true class
    suggested 2.5 -> 4.0 of 5 a run with plain CV, 1.0 -> 2.0 with style-grouped CV (BENCHMARKS.md)."""
    from cleanlab.filter import find_label_issues  # 2 s of import: only the report pays it

    present = np.unique(labels)
    if len(present) < 2:
        return np.zeros(0, int), np.zeros(0, int), np.zeros(0)
    # cleanlab wants classes 0..K-1 all present; a class with no labelled image is dropped from the columns
    sub = probs[:, present] / probs[:, present].sum(1, keepdims=True)
    y = np.searchsorted(present, labels)
    idx = find_label_issues(labels=y, pred_probs=sub, return_indices_ranked_by="normalized_margin")
    other = probs[idx].copy()
    other[np.arange(len(idx)), labels[idx]] = -1  # the suggestion is never the label it replaces
    suggested = other.argmax(1)
    return idx, suggested, probs[idx, labels[idx]] - other[np.arange(len(idx)), suggested]


def learning_curve(*, rows: Rows, fold: np.ndarray, params: Params, max_val: int | None,
                   sizes: tuple[int, ...] = SIZES) -> list[dict]:
    """Per size n: every class's training rows in each fold cut to at most n (a seeded random subset), the head
    trained as train-head trains it, macro-F1 on the fold's full test rows; mean over folds and a 95% interval
    (mean +- Student's t with k - 1 degrees of freedom times the standard error, as noise.paired_difference;
    clipped to [0, 1]). The last point is every training image."""

    lab = rows.labels >= 0
    k = int(fold.max()) + 1
    sources = cv_sources(rows.groups, fold)
    per_class = np.bincount(rows.labels[lab], minlength=len(rows.class_names))
    largest = int(min(np.bincount(rows.labels[lab & (fold != j)], minlength=len(per_class)).max() for j in range(k)))
    out = []  # small subsets get no early-stopping slice by train-head's own rule (fewer than min_val_images)
    # classes smaller than n keep all their images: past the smallest class the cut applies to the larger ones
    for n in [s for s in sizes if s < largest] + [None]:
        f1 = []
        for j in range(k):
            train = lab & (fold != j)
            if n is not None:
                rng = np.random.default_rng(params.cv.seed * 1000 + j * 31 + n)
                keep = np.zeros(len(train), bool)
                for c in np.flatnonzero(per_class):
                    members = np.flatnonzero(train & (rows.labels == c))
                    keep[rng.choice(members, min(n, len(members)), replace=False)] = True
                train = keep
            head = fit_rows(rows, train, params.head, params.cv.seed + j, max_val)
            te = fold == j
            pred = rows_logits(head, rows, te, sources, params.head.adapt)[0].argmax(1)  # as CV predicted
            f1.append(classification_metrics(rows.labels[te], pred, rows.class_names)["macro_f1"])
        m, half = float(np.mean(f1)), float(t975(k - 1) * np.std(f1, ddof=1) / np.sqrt(k)) if k > 1 else 0.0
        most = max(int(np.bincount(rows.labels[lab & (fold != j)]).max()) for j in range(k))  # all training rows
        out.append({"per_class": n if n is not None else most,
                    "all": n is None, "macro_f1": m, "lo": max(0.0, m - half), "hi": min(1.0, m + half)})
    return out


def embedding_2d(features: np.ndarray) -> np.ndarray:
    """(N, D) -> (N, 2): the first two principal components of the standardised features."""
    x = features.astype(np.float64)
    x = (x - x.mean(0)) / (x.std(0) + 1e-12)
    _, _, vt = np.linalg.svd(x - x.mean(0), full_matrices=False)
    return (x @ vt[:2].T).astype(np.float32)


def near_duplicates(features: np.ndarray, fold: np.ndarray, *, threshold: float = 0.97, max_queries: int = 20000,
                    random_state: int = 0, top: int = 30) -> list[tuple[int, int, float]]:
    """(i, j, cosine) for pairs in different folds whose features have cosine >= threshold, most similar first:
    they inflate CV scores."""
    x = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)  # (N, D)
    q = np.arange(len(x))
    if len(q) > max_queries:  # N^2 D gets slow; sample the queries, never the candidates
        q = np.sort(np.random.default_rng(random_state).choice(len(x), max_queries, replace=False))
    found: dict[tuple[int, int], float] = {}
    for i0 in range(0, len(q), 1024):
        qi = q[i0:i0 + 1024]
        sim = x[qi] @ x.T  # (b, N)
        sim[fold[qi][:, None] == fold[None, :]] = -1  # only pairs across folds
        for a, b in zip(*np.nonzero(sim >= threshold)):
            i, j = sorted((int(qi[a]), int(b)))
            found[(i, j)] = float(sim[a, b])
    return [(i, j, s) for (i, j), s in sorted(found.items(), key=lambda kv: -kv[1])[:top]]


def closest_across_folds(features: np.ndarray, fold: np.ndarray, top: int = 10) -> list[tuple[int, int, float]]:
    """(i, j, cosine) of the `top` most similar pairs in different folds, however similar: crops of one photo or
    shots of one scene fall below near_duplicates' threshold (median cosine 0.76 for crops of one photo, at most
    0.43 between different photos, Lite0) and a person spots them at a glance. Each image's best match only."""
    x = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)  # (N, D)
    best: dict[tuple[int, int], float] = {}
    for i0 in range(0, len(x), 1024):
        sim = x[i0:i0 + 1024] @ x.T  # (b, N)
        sim[fold[i0:i0 + 1024][:, None] == fold[None, :]] = -np.inf  # only pairs across folds
        j = sim.argmax(1)
        for a, b in enumerate(j):
            if np.isfinite(sim[a, b]):
                best[tuple(sorted((i0 + a, int(b))))] = float(sim[a, b])
    return [(i, j, s) for (i, j), s in sorted(best.items(), key=lambda kv: -kv[1])[:top]]
