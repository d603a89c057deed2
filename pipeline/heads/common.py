"""What both estimators share: their input as blocks, standardisation, class weights and early stopping; and
the labelled rows of a store a slice at a time.

A head's input X is either an array (N, D) of raw features (the store in memory) or a sequence of such blocks
in row order, read from the store on access (pipeline/data/rows.py RowBlocks: stores beyond the memory budget).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

Blocks = Sequence[np.ndarray]  # (r_i, D) float32 each, in row order


def block_sizes(blocks: Blocks) -> list[int]:
    """Rows per block, without reading a streamed block (RowBlocks and _Standardised know them)."""
    return list(getattr(blocks, "sizes", None) or [len(b) for b in blocks])


def robust_scale(std: np.ndarray) -> np.ndarray:
    """Per-dimension divisor for standardisation. Dimensions (nearly) constant in training would be blown up
    by 1/std when they move at test time (another style, another camera): never amplify one more than 10x
    the typical dimension."""
    return np.maximum(std, 0.1 * float(std.mean()) + 1e-12).astype(np.float32)


def standardise(X: np.ndarray | Blocks, copy: bool = True) -> tuple[Blocks, np.ndarray, np.ndarray]:
    """(standardised blocks, mean (D,), scale (D,)) of the rows X. An array is standardised once, in place when
    `copy` is False (the caller's own copy: the fit then holds no second one); streamed blocks are measured in
    one pass (Chan et al.'s exact combination) and standardised as each is read."""
    if isinstance(X, np.ndarray):
        x = X.astype(np.float32, copy=copy)  # (N, D)
        mean = x.mean(0, dtype=np.float64).astype(np.float32)
        x -= mean
        scale = robust_scale(np.sqrt(np.einsum("ij,ij->j", x, x, dtype=np.float64) / max(len(x), 1)))
        x /= scale
        return [x], mean, scale
    n, mean, m2 = 0, 0.0, 0.0
    for xb in X:
        nb, mean_b, var_b = len(xb), xb.mean(0, dtype=np.float64), xb.var(0, dtype=np.float64)
        delta, tot = mean_b - mean, n + nb
        mean, m2, n = mean + delta * nb / tot, m2 + var_b * nb + delta ** 2 * n * nb / tot, tot
    mean, scale = np.asarray(mean, np.float32), robust_scale(np.sqrt(np.asarray(m2) / max(n, 1)))
    return _Standardised(X, mean, scale), mean, scale


class _Standardised(Sequence):
    """Streamed blocks, standardised as they are read."""

    def __init__(self, blocks: Blocks, mean: np.ndarray, scale: np.ndarray):
        self.raw, self.mean, self.scale = blocks, mean, scale
        self.sizes = block_sizes(blocks)

    def __len__(self) -> int:
        return len(self.raw)

    def __getitem__(self, i: int) -> np.ndarray:
        return (self.raw[i] - self.mean) / self.scale


def class_weights(y: np.ndarray, n_classes: int, class_weight: str) -> np.ndarray:
    """(C,) float32: 1 each ('none'), or 'balanced' as scikit-learn's: N / (C * count), 0 for an absent class."""
    if class_weight == "none":
        return np.ones(n_classes, np.float32)
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    return np.where(counts > 0, len(y) / (n_classes * np.maximum(counts, 1)), 0.0).astype(np.float32)


def sample_weights(y: np.ndarray, n_classes: int, class_weight: str, sample_weight: np.ndarray | None) -> np.ndarray:
    """(N,) float32: each row's class weight times its `sample_weight` (default 1)."""
    w = class_weights(y, n_classes, class_weight)[y]
    return w if sample_weight is None else w * np.asarray(sample_weight, np.float32)


class EarlyStopping:
    """Stop after `patience` checks without a new best loss, or once the best improved by less than `tol` over the
    last `patience` checks: converged. `tol` is relative to the best loss then (a validation loss, which levels off
    above zero), or with `of_first`, to the first check's loss (a training loss: on rows a head can separate it
    falls toward zero, each check gaining a steady fraction of what is left, so gains relative to the loss itself
    never fall below `tol` and the fit ran to its epoch cap). `improved`: the last check set a new best (the caller
    keeps that head)."""

    def __init__(self, patience: int, tol: float, of_first: bool = False):
        self.patience, self.tol, self.of_first = patience, tol, of_first
        self.history: list[float] = []  # best loss after each check
        self.best_loss, self.bad, self.stop, self.improved = float("inf"), 0, False, False

    def update(self, loss: float) -> None:
        self.improved = loss < self.best_loss - 1e-6
        if self.improved:
            self.best_loss, self.bad = loss, 0
        else:
            self.bad += 1
        self.history.append(self.best_loss)
        then = self.history[-1 - self.patience] if len(self.history) > self.patience else None
        scale = self.history[0] if self.of_first else then
        converged = then is not None and then - self.best_loss < self.tol * scale
        self.stop = self.bad >= self.patience or converged


def labelled_blocks(rows, mask: np.ndarray, size: int = 65536, labels: np.ndarray | None = None):
    """(features (r, D), labels (r,)) of the store rows (pipeline/data/rows.py) in `mask`, a bounded slice at a
    time, in row order; `labels` (N,) in place of the store's. Read only: a slice may be a view of the rows."""
    labels = rows.labels if labels is None else labels
    for start, x in rows.blocks(mask):
        m, y = mask[start:start + len(x)], labels[start:start + len(x)]
        for i in range(0, len(x), size):
            part = m[i:i + size]  # a slice wholly in `mask` is passed as it is, not copied
            yield (x[i:i + size], y[i:i + size]) if part.all() else (x[i:i + size][part], y[i:i + size][part])
