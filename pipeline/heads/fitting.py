"""How train-head fits a head on a set of store rows: the estimator its params name, the early-stopping slice
carved from the training rows, each group aligned (heads/align.py), and the training statistics a new source is
adapted to (heads/adapt.py). CV folds, the final fit, the sweep and the learning curve all call fit_rows."""
from __future__ import annotations

import dataclasses
import importlib
import threading

import numpy as np

from pipeline.heads.adapt import fit_reference
from pipeline.heads.align import TrainingView, fit_alignment
from pipeline.heads.common import labelled_blocks
from pipeline.heads.head import Head, Reference
from pipeline.params import HeadParams


def make_head(params: HeadParams, n_classes: int, random_state: int):
    """The estimator for `params` (hidden: [] -> LinearHead, else MLPHead; never 'auto', which train resolves).
    `epochs` caps the MLP's passes over the data and the linear head's L-BFGS iterations (each about two passes)."""
    if not params.hidden:
        from pipeline.heads.linear import LinearHead
        return LinearHead(n_classes=n_classes, weight_decay=params.weight_decay, max_iter=params.epochs,
                          patience=params.patience, tol=params.tol, class_weight=params.class_weight)
    from pipeline.heads.mlp import MLPHead  # torch, imported only for a hidden layer (1.7 s)
    return MLPHead(n_classes=n_classes, hidden=params.hidden, dropout=params.dropout, lr=params.lr,
                   weight_decay=params.weight_decay, epochs=params.epochs, batch_size=params.batch_size,
                   patience=params.patience, tol=params.tol, class_weight=params.class_weight,
                   random_state=random_state)


def import_torch_beside(hidden: list) -> threading.Thread | None:
    """When some head among `hidden` (each a params value: 'auto', [] or [256]) has hidden layers, start torch's
    import (heads/mlp.py, 1.4 s) in a thread, beside the reading and the linear head's CV that come first, rather
    than before the first hidden-layer fit; make_head's import then waits for it, at most (Python's import lock).
    A failing import is left to make_head's, which reports it. Not a daemon: the interpreter never exits mid-import."""
    if not any(h == "auto" or h for h in hidden):
        return None

    def load():
        try:
            importlib.import_module("pipeline.heads.mlp")
        except Exception:  # noqa: BLE001 - said by make_head's own import, where it is needed
            pass
    thread = threading.Thread(target=load, name="import torch")
    thread.start()
    return thread


def split_validation(*, labels: np.ndarray, train: np.ndarray, params: HeadParams, random_state: int,
                     max_rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(fit mask, validation mask) carved from `train`: a stratified `val_fraction` slice, or none when it would
    hold fewer than `min_val_images` (a slice of a few dozen images stops training at noise) or fewer than
    `min_val_per_class` images of some class (with so few images a class, each one held out costs the fit more
    than early stopping gains: 100 classes x 80 images lose 0.01 macro-F1 to a 10% slice)."""
    idx = np.flatnonzero(train)
    n_val = int(round(params.val_fraction * len(idx)))
    val = np.zeros(len(labels), bool)
    y = labels[idx]
    counts = np.bincount(y)
    smallest = int(counts[counts > 0].min()) if len(y) else 0
    if (params.val_fraction == 0 or n_val < params.min_val_images
            or round(params.val_fraction * smallest) < params.min_val_per_class):
        return train.copy(), val
    rng = np.random.default_rng(random_state)
    picked = []
    for c in np.unique(y):  # stratified: the same fraction of every class
        members = rng.permutation(idx[y == c])
        picked.append(members[:int(round(params.val_fraction * len(members)))])
    chosen = np.concatenate(picked)
    if max_rows is not None and len(chosen) > max_rows:  # streamed stores: the slice must fit in memory
        chosen = rng.choice(chosen, max_rows, replace=False)
    val[chosen] = True
    return train & ~val, val


def fit_rows(rows, train: np.ndarray, params: HeadParams, random_state: int, max_val: int | None = None,
             reference: bool = True, view: "TrainingView | None" = None) -> Head:
    """One head on the store rows (pipeline/data/rows.py) where `train` is True, early-stopping on a slice of them by
    split_validation's rule, with the Reference statistics of all of them (unless `reference` is False: a CV fit
    that no transform adapts to). With `align: groups` and a group column the head is fitted on the rows with
    each group aligned (heads/align.py). `view`: training_view(rows, train, params.align), when the caller has
    it (CV shares each fold's among its heads). Holds one copy of the fit's rows (standardised in place), or
    none when streamed."""
    if view is None and (reference or aligns(rows, params.align)):
        view = training_view(rows, train, params.align)
    on = view.rows if view is not None else rows
    fit, val = split_validation(labels=rows.labels, train=train, params=params, random_state=random_state,
                                max_rows=max_val)
    head = make_head(params, len(rows.class_names), random_state)
    head.fit(on.features_of(fit), rows.labels[fit], val=(on.take(val), rows.labels[val]) if val.any() else None,
             copy=False)
    return dataclasses.replace(head.head_, reference=view.reference) if reference else head.head_


def aligns(rows, align: str) -> bool:
    """Whether a head fitted on `rows` with this `align` sees each group aligned: align: groups, and groups to align
    (selection/heads.choose_head sets align: none where adapt: none is set, and the head meets raw features)."""
    return align == "groups" and rows.groups is not None


def training_view(rows, train: np.ndarray, align: str) -> TrainingView:
    """The TrainingView of the rows where `train` is True: with align 'groups' and a group column, each group
    aligned onto the statistics of the rows as stored (heads/align.py), else the rows as stored."""
    ref = training_reference(rows, train)
    return fit_alignment(rows, train, ref) if aligns(rows, align) else TrainingView(rows, ref)


def training_reference(rows, train: np.ndarray) -> Reference:
    """The Reference statistics (heads/adapt.py) of the labelled store rows where `train` is True, one pass."""
    return fit_reference(labelled_blocks(rows, train), len(rows.class_names))
