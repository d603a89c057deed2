"""Which cross-validation fold each image is tested in: one rule for every store size.

Stratified by class; a manifest `group` (e.g. one emoji style, one photographer, one patient) never
straddles folds, and neither do identical images (same sha256), so near-copies never sit on both sides.
"""
from __future__ import annotations

import numpy as np

from features.errors import UserError


def assign_folds(*, labels: np.ndarray, groups: list[str] | None, sha256: list[str], k: int,
                 class_names: list[str], random_state: int) -> np.ndarray:
    """Fold index in [0, k) per labelled row, -1 for unlabelled rows (labels < 0).
    Raises a UserError naming cv.folds when the data cannot support k folds."""
    lab = labels >= 0
    y = labels[lab]
    counts = np.bincount(y, minlength=len(class_names))
    present = np.flatnonzero(counts)
    if len(present) < 2:
        raise UserError(f"only one class ({class_names[present[0]] if len(present) else 'none'}) has labelled images; "
                        "a classifier needs at least two class folders")
    if len(present) < len(class_names):  # every image of it skipped, or named by a manifest's --classes only:
        # a head cannot learn it, and its F1 of 0 would be averaged into every macro score
        absent = [class_names[c] for c in np.flatnonzero(counts == 0)]
        more = f" (nor {len(absent) - 1} more)" if len(absent) > 1 else ""
        raise UserError(f"class '{absent[0]}' has no labelled images{more} (the store lists it, but its images were "
                        "skipped or never there); a head cannot learn it and its F1 of 0 would lower every macro "
                        "score: add images of it, or leave it out (extract --classes)")
    smallest = int(present[np.argmin(counts[present])])
    if counts[smallest] < 2:
        raise UserError(f"class '{class_names[smallest]}' has only {counts[smallest]} labelled image; cross-validation "
                        "needs at least 2 per class (one to train on, one to test): add images of it, or leave it "
                        "out (extract --classes, or remove its folder)")
    if k > counts[smallest]:
        raise UserError(f"params: cv.folds={k} exceeds the smallest class count {counts[smallest]} "
                        f"(class '{class_names[smallest]}'); lower cv.folds to at most {counts[smallest]} or add images")
    # Rows that must share a fold share a key: identical images, and with groups every row of a group (and of
    # any group sharing an identical image with it).
    key = _group_keys(groups, sha256) if groups is not None else \
        np.unique(np.asarray(sha256, dtype="S64"), return_inverse=True)[1]  # bytes: a quarter of str's memory
    key = key[lab]
    n_keys = len(np.unique(key))
    if k > n_keys:
        raise UserError(f"params: cv.folds={k} exceeds the {n_keys} groups of images; lower cv.folds")
    fold = np.full(len(labels), -1, dtype=np.int64)
    fold[lab] = sub = _deal(key, y, k, len(class_names), random_state)
    _check_every_fold_can_measure(sub, y, k, class_names, grouped=n_keys < len(key))
    return fold


def _deal(key: np.ndarray, y: np.ndarray, k: int, n_classes: int, random_state: int) -> np.ndarray:
    """Fold per row, one rule for every layout: the keys (rows that must share a fold) are dealt one at a time,
    largest first, then class by class in random order, each to the fold holding the fewest rows of the key's
    majority class so far (ties: the fewest rows in all, then the lowest index). Without groups or copies every
    key is one row: each class is dealt round-robin, continuing from class to class, so every class's count per
    fold differs by at most 1. About 2 s per million keys on 2 cores (hashing the keys costs more)."""
    rng = np.random.default_rng(random_state)
    _, first, inv = np.unique(key, return_index=True, return_inverse=True)
    inv = np.argsort(np.argsort(first))[inv]  # (n,) keys numbered in the order their first row appears
    n_keys = len(first)
    counts = np.zeros((n_keys, n_classes), np.int64)  # (K, C) rows of each class in each key
    np.add.at(counts, (inv, y), 1)
    sizes, major = counts.sum(1), counts.argmax(1)
    order = [rng.permutation(np.flatnonzero((sizes == size) & (major == c)))  # largest first, class by class,
             for size in sorted(set(sizes.tolist()), reverse=True) for c in range(n_classes)]  # random within
    order = np.concatenate(order)
    per_class = [[0] * n_classes for _ in range(k)]  # Python ints: this loop runs once per key
    total = [0] * k
    where = np.empty(n_keys, np.int64)
    for g, c, size in zip(order.tolist(), major[order].tolist(), sizes[order].tolist()):
        f = 0
        for j in range(1, k):  # the fewest of class c, then the fewest in all, then the lowest index
            if (per_class[j][c], total[j]) < (per_class[f][c], total[f]):
                f = j
        where[g] = f
        per_class[f][c] += size  # the key's majority class carries its size: keys are mostly one class
        total[f] += size
    return where[inv]


def _check_every_fold_can_measure(fold: np.ndarray, y: np.ndarray, k: int, class_names: list[str],
                                  grouped: bool) -> None:
    """Refuse folds whose score would mean nothing: a training part missing a class (the head cannot predict
    it, so its test images count as errors) or a test part holding a single class. Groups cause both: when a
    class lives in one group, every fold that tests that group trains without the class."""
    why = ("its images share too few groups (a manifest's group column, or identical images); use other groups "
           "or a manifest without the group column, or " if grouped else "")
    for j in range(k):
        train, test = y[fold != j], y[fold == j]
        missing = sorted(set(np.unique(y).tolist()) - set(np.unique(train).tolist()))
        if missing:
            raise UserError(f"CV fold {j + 1} of {k} trains without class '{class_names[missing[0]]}' (all its "
                            f"images are in that fold's test part), so the CV score would be meaningless: "
                            f"{why}lower cv.folds, or add images of that class")
        if len(np.unique(test)) < 2:
            raise UserError(f"CV fold {j + 1} of {k} tests only class '{class_names[int(test[0])]}', so its score "
                            f"would be meaningless: {why}lower cv.folds")


def _group_keys(groups: list[str], sha256: list[str]) -> np.ndarray:
    """Union of 'same group' and 'same image': connected components over rows (union-find)."""
    n = len(groups)
    parent = np.arange(n)

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[tuple[int, str], int] = {}
    for i, (g, s) in enumerate(zip(groups, sha256)):
        for key in (((0, g),) if g else ()) + ((1, s),):  # an empty group is no group
            j = first.setdefault(key, i)
            a, b = find(i), find(j)
            if a != b:
                parent[a] = b
    return np.array([find(i) for i in range(n)])


def cv_sources(groups: list[str] | None, fold: np.ndarray) -> np.ndarray:
    """The source of each row in CV: its group, or without groups its fold (each fold's test part is one source)."""
    if groups is not None:
        return np.asarray(groups, dtype=str)
    names = np.array([f"fold {j}" for j in range(int(fold.max(initial=-1)) + 2)], dtype=str)  # fold -1: 'fold 0'
    return names[fold + 1]  # (N,): one string per fold, not one per row
