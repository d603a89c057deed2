"""The linear head: multinomial logistic regression on standardised features, fitted by L-BFGS on the full batch
(as scikit-learn's LogisticRegression), with early stopping on a validation slice when given one."""
from __future__ import annotations

import numpy as np

from pipeline.heads.common import Blocks, EarlyStopping, class_weights, sample_weights, standardise
from pipeline.heads.head import Head, blas_threads_for
from pipeline.heads.lbfgs import lbfgs
from pipeline.heads.loss import linear_loss_gradient, softmax_cross_entropy, split_coef

# Converged when max |gradient| <= GTOL. scikit-learn's LogisticRegression stops at 1e-4; 1e-5 generalises better
# to image styles never seen in training (docs/benchmarks.md, leave-one-style-out).
GTOL = 1e-5


class LinearHead:
    """fit(X, y) -> self; then predict_proba(X), and the fitted `head_` (a Head), `coef_` (C, D), `intercept_`
    (C,) on standardised features, `mean_`, `scale_` (D,), `n_iter_`.

    Objective: mean weighted cross-entropy + weight_decay / 2 * |W|^2. Stops at convergence (GTOL, or a relative
    loss change below 1e-9), after `max_iter` L-BFGS iterations (about two passes over X each), or when the loss
    on `val` stopped improving (EarlyStopping, checked every iteration; the best point is kept)."""

    def __init__(self, *, n_classes: int, weight_decay: float = 1e-4, max_iter: int = 60, patience: int = 3,
                 tol: float = 0.01, class_weight: str = "balanced"):
        self.n_classes, self.weight_decay, self.max_iter = n_classes, weight_decay, max_iter
        self.patience, self.tol, self.class_weight = patience, tol, class_weight

    def fit(self, X: np.ndarray | Blocks, y: np.ndarray, sample_weight: np.ndarray | None = None,
            val: tuple[np.ndarray, np.ndarray] | None = None, copy: bool = True, stop=None) -> "LinearHead":
        """X: raw features (N, D) or blocks of them (streamed); y (N,) in [0, n_classes); val: (Xv (V, D), yv (V,))
        raw, for early stopping. copy=False lets the fit standardise an array X in place. stop(): asked after each
        iteration; True ends the fit there (its CV gave up: the head is discarded)."""
        C = self.n_classes
        blocks, self.mean_, self.scale_ = standardise(X, copy=copy)
        w = sample_weights(y, C, self.class_weight, sample_weight)  # (N,)
        D = len(self.mean_)
        stopper, best = EarlyStopping(self.patience, self.tol), {"loss": np.inf, "coef": None}
        if val is not None and len(val[1]):
            xv = (np.asarray(val[0], np.float32) - self.mean_) / self.scale_  # (V, D)
            yv = np.asarray(val[1])
            wv = class_weights(y, C, self.class_weight)[yv]  # (V,) weighted as the training rows' classes

            def check(coef: np.ndarray) -> bool:  # after every iteration: stop?
                W, b = split_coef(coef, C)
                loss = softmax_cross_entropy(xv @ W.T + b, yv, wv)[0] / float(wv.sum())
                if loss < best["loss"]:
                    best["loss"], best["coef"] = loss, coef.copy()
                stopper.update(loss)
                return stopper.stop
        else:
            check = None

        def after_iteration(coef: np.ndarray) -> bool:  # stop here?
            return bool(check is not None and check(coef)) or (stop is not None and stop())
        with blas_threads_for(len(y)):  # a few hundred rows: one BLAS thread (heads/head.py)
            x, self.n_iter_ = lbfgs(lambda coef: linear_loss_gradient(coef, blocks, y, w, self.weight_decay, C),
                                    np.zeros(C * (D + 1), np.float32), max_iter=self.max_iter, gtol=GTOL,
                                    callback=after_iteration)
        self.coef_, self.intercept_ = split_coef(best["coef"] if best["coef"] is not None else x, C)
        self.head_ = Head([(self.coef_, self.intercept_)], self.mean_, self.scale_,
                          capped=self.n_iter_ >= self.max_iter)  # every iteration allowed was used
        return self

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return self.head_(X)
