"""How train-head fits a head on a set of store rows: the estimator its params name, the early-stopping slice
carved from the training rows, each group aligned (heads/align.py), and the training statistics a new source is
adapted to (heads/adapt.py). CV folds, the final fit, the sweep and the learning curve all call fit_rows."""
from __future__ import annotations

import dataclasses
import threading

import numpy as np

from pipeline.data.folds import cv_sources
from pipeline.heads.adapt import class_sums, fit_reference, reference_from
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
             reference: bool = True, view: "TrainingView | None" = None, stop=None) -> Head:
    """One head on the store rows (pipeline/data/rows.py) where `train` is True, early-stopping on a slice of them by
    split_validation's rule, with the Reference statistics of all of them (unless `reference` is False: a CV fit
    that no transform adapts to). With `align: groups` and a group column the head is fitted on the rows with
    each group aligned (heads/align.py). `view`: training_view(rows, train, params.align), when the caller has
    it (CV shares each fold's among its heads). `stop`: the estimator's (a CV that gave up ends the fit at its
    next check; the head is then discarded). Holds one copy of the fit's rows (standardised in place), or none
    when streamed."""
    if view is None and (reference or aligns(rows, params.align)):
        view = training_view(rows, train, params.align)
    on = view.rows if view is not None else rows
    fit, val = split_validation(labels=rows.labels, train=train, params=params, random_state=random_state,
                                max_rows=max_val)
    head = make_head(params, len(rows.class_names), random_state)
    head.fit(on.features_of(fit), rows.labels[fit], val=(on.take(val), rows.labels[val]) if val.any() else None,
             copy=False, stop=stop)
    return dataclasses.replace(head.head_, reference=view.reference) if reference else head.head_


def fit_final(rows, params: HeadParams, random_state: int, max_val: int | None = None,
              views: "FoldViews | None" = None, stop=None) -> Head:
    """The final head: fit_rows on every labelled row, with the statistics of CV's sums (views.whole) when the
    caller has CV's FoldViews."""
    return fit_rows(rows, rows.labels >= 0, params, random_state, max_val,
                    view=views.whole(params.align) if views is not None else None, stop=stop)


def aligns(rows, align: str) -> bool:
    """Whether a head fitted on `rows` with this `align` sees each group aligned: align: groups, and groups to align
    (selection/heads.choose_head sets align: none where adapt: none is set, and the head meets raw features)."""
    return align == "groups" and rows.groups is not None


def training_view(rows, train: np.ndarray, align: str, reference: Reference | None = None) -> TrainingView:
    """The TrainingView of the rows where `train` is True: with align 'groups' and a group column, each group
    aligned onto the statistics of the rows as stored (heads/align.py), else the rows as stored. `reference`:
    those statistics, when the caller has them (FoldViews)."""
    ref = training_reference(rows, train) if reference is None else reference
    return fit_alignment(rows, train, ref) if aligns(rows, align) else TrainingView(rows, ref)


class FoldViews:
    """Each CV fold's TrainingView (what its heads are fitted on and its held-out sources adapted to), and the
    view of every labelled row (the final fit's), made when first asked for and shared by every head CV'd on
    these folds. Their statistics all come from one pass over the labelled rows, class sums per fold and class:
    a fold's are the sum over the other folds, the final fit's the sum over all (28,700 x 1280: 0.13 s a fold,
    and a 35,887-row pass for the final fit; a streamed store: one read, not k + 1)."""

    def __init__(self, rows, fold: np.ndarray):
        self.rows, self.fold = rows, fold
        self._sums: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # (k, C, D), (k, C, D), (k, C)
        self._views: dict[tuple[int, str], TrainingView] = {}
        self._sources: np.ndarray | None = None
        self._lock = threading.Lock()  # fold tasks run side by side in threads (selection/foldwork.py)

    def get(self, j: int, align: str) -> TrainingView:
        """Fold j's view: its training rows are the labelled rows of every other fold; j = -1: of every fold."""
        with self._lock:  # each view made once, by whichever fold task asks first
            if self._sums is None:
                self._sums = self._fold_sums()
            if (j, align) not in self._views:
                train, used = (self.rows.labels >= 0) & (self.fold != j), np.arange(len(self._sums[2])) != j
                self._views[j, align] = training_view(self.rows, train, align,
                                                      reference_from(*(a[used].sum(0) for a in self._sums)))
            return self._views[j, align]

    @property
    def sources(self) -> np.ndarray:
        """(N,) each row's source in CV (data/folds.cv_sources), made once for every head CV'd on these folds."""
        with self._lock:
            if self._sources is None:
                self._sources = cv_sources(self.rows.groups, self.fold)
            return self._sources

    def whole(self, align: str) -> TrainingView:
        """The view of every labelled row: the final fit's."""
        return self.get(-1, align)

    def _fold_sums(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        C, k = len(self.rows.class_names), int(self.fold.max()) + 1
        lab = self.rows.labels >= 0
        key = np.where(lab, self.fold * C + self.rows.labels, 0)  # (N,) fold and class as one label
        return tuple(a.reshape(k, C, *a.shape[1:]) for a in class_sums(labelled_blocks(self.rows, lab, labels=key),
                                                                     k * C))


def training_reference(rows, train: np.ndarray) -> Reference:
    """The Reference statistics (heads/adapt.py) of the labelled store rows where `train` is True, one pass."""
    return fit_reference(labelled_blocks(rows, train), len(rows.class_names))
