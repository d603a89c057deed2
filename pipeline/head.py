"""The dense softmax head and its fit, for features in memory or streamed from the store:
standardise -> [Linear + ReLU + Dropout] x len(hidden) -> Linear -> softmax cross-entropy, with weight decay and
early stopping on a held-out slice once the validation loss stops improving by `tol`. No hidden layer
(`hidden: []`, multinomial logistic regression): full-batch L-BFGS in numpy, as scikit-learn's
LogisticRegression. Hidden layers: Adam in mini-batches, in torch (pipeline/mlp.py, imported only then).

A fitted head is numpy arrays (`Head`): inference, the model directory and every consumer need no torch.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.calibration import softmax
from pipeline.optim import lbfgs
from pipeline.params import HeadParams
from pipeline.rows import Rows

# The linear head has converged when max |gradient| <= GTOL. scikit-learn's LogisticRegression stops at 1e-4; on
# emoji styles never seen in training 1e-5 gives +0.04 macro-F1 over that (leave-one-style-out, faces7, fused:
# 0.587 vs 0.547; BENCHMARKS.md), on a synthetic 100-class set 0.003 less and 1.3x the time: kept at 1e-5.
GTOL = 1e-5


@dataclass
class Head:
    """A fitted head: standardisation, Linear layers with ReLU between them, temperature. Built by fit_head or by a
    validated load (pipeline/modeldir.py)."""
    layers: list[tuple[np.ndarray, np.ndarray]]  # (W (out, in), b (out,)) float32 per Linear layer
    mean: np.ndarray  # (D,)
    scale: np.ndarray  # (D,)
    temperature: float = 1.0  # fitted on out-of-fold logits

    @property
    def hidden(self) -> tuple[int, ...]:
        return tuple(w.shape[0] for w, _ in self.layers[:-1])

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Raw features (B, D) -> uncalibrated logits (B, C)."""
        z = (np.asarray(x, np.float32) - self.mean) / self.scale
        for i, (w, b) in enumerate(self.layers):
            z = z @ w.T + b
            if i < len(self.layers) - 1:
                np.maximum(z, 0, out=z)
        return z

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Raw features (B, D) -> calibrated probabilities (B, C)."""
        return softmax(self.logits(x), self.temperature).astype(np.float32)


def robust_scale(std: np.ndarray) -> np.ndarray:
    """Per-dimension divisor for standardisation. Dimensions (nearly) constant in training would be blown up
    by 1/std when they move at test time (another style, another camera): never amplify one more than 10x
    the typical dimension."""
    return np.maximum(std, 0.1 * float(std.mean()) + 1e-12).astype(np.float32)


def class_weights(labels: np.ndarray, n_classes: int, mode: str) -> np.ndarray:
    if mode == "none":
        return np.ones(n_classes, np.float32)
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    return np.where(counts > 0, len(labels) / (n_classes * np.maximum(counts, 1)), 0.0).astype(np.float32)


def split_validation(*, labels: np.ndarray, train: np.ndarray, params: HeadParams, random_state: int,
                     max_rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(fit mask, validation mask) carved from `train`: a stratified `val_fraction` slice, or none when it would
    hold fewer than `min_val_images` (a slice of a few dozen images stops training at noise) or fewer than
    `min_val_per_class` images of some class (with so few images a class, each one held out costs the fit more
    than early stopping gains: 100 classes x 80 images lose 0.01 macro-F1 to a 10% slice, BENCHMARKS.md)."""
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


def _stats(rows: Rows, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and robust scale (D,) over the rows in `mask`: one pass over the blocks, combined exactly (Chan et al.)."""
    n, mean, m2 = 0, np.zeros(rows.dim), np.zeros(rows.dim)
    for s, x in rows.blocks(mask):
        xb = x[mask[s:s + len(x)]]
        if not len(xb):
            continue
        nb, mean_b = len(xb), xb.mean(0, dtype=np.float64)
        var_b = xb.var(0, dtype=np.float64)
        delta, tot = mean_b - mean, n + nb
        mean, m2, n = mean + delta * nb / tot, m2 + var_b * nb + delta ** 2 * n * nb / tot, tot
    return mean.astype(np.float32), robust_scale(np.sqrt(m2 / max(n, 1)))


def standardise_in_place(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Standardise the rows x (n, D) float32 in place by their own mean and robust scale; returns both (D,)."""
    mean = x.mean(0, dtype=np.float64).astype(np.float32)
    x -= mean
    scale = robust_scale(np.sqrt(np.einsum("ij,ij->j", x, x, dtype=np.float64) / max(len(x), 1)))
    x /= scale
    return mean, scale


class Standardised:
    """The training rows as standardised (x (n, D) float32, y (n,)) blocks, re-iterable: one block in memory,
    the store's blocks (read again on every pass) when streamed."""
    shift = ratio = None  # the blocks are the fit's standardised space itself (see PoolRows)

    def __init__(self, rows: Rows, train: np.ndarray):
        self.rows, self.train = rows, train
        y_all = np.maximum(rows.labels, 0)
        if rows.in_memory:  # one copy of the training rows: stats from it, then standardised in place
            xt = rows.features[train]  # (T, D)
            self.mean, self.scale = standardise_in_place(xt)
            self.cached: list | None = [(xt, y_all[train])]
        else:
            self.mean, self.scale = _stats(rows, train)
            self.cached = None
        self.y_all = y_all

    def __iter__(self):
        if self.cached is not None:
            yield from self.cached
            return
        for s, x in self.rows.blocks(self.train):
            m = self.train[s:s + len(x)]
            if m.any():
                yield (x[m] - self.mean) / self.scale, self.y_all[s:s + len(x)][m]


class Pool:
    """The labelled rows of an in-memory store standardised once (by their mean and robust scale) and ordered fold
    by fold, for the linear head's repeated fits on them (CV folds, final fit, sweep configs). A fold's training
    rows are then two runs of it, read in place; its early-stopping slice stays in the runs with label -1 (weight
    0: 10% more rows in the products, no copy); and the fit's own standardisation, by the mean and scale of its
    rows alone as Standardised computes them, becomes a shift and ratio per dimension folded into the weights
    (PoolRows). Saves a copy of the rows and three passes over them per fit (0.06 of a 0.35 s fit on
    8,000 x 1,280); costs one copy of the labelled rows for as long as it is kept."""

    def __init__(self, rows: Rows, labelled: np.ndarray, fold: np.ndarray):
        order = np.flatnonzero(labelled)
        order = order[np.argsort(fold[order], kind="stable")]
        self.pos = np.full(len(rows), -1)  # (N,) each row's place in the pool, -1: not in it
        self.pos[order] = np.arange(len(order))
        x = rows.features[order]  # (n, D) a copy
        self.mean, self.scale = standardise_in_place(x)  # (D,) each, raw units
        self.x, self.y = x, np.maximum(rows.labels[order], 0)  # (n, D), (n,)
        self.s1 = x.sum(0, dtype=np.float64)  # (D,) sums of the standardised rows and of their squares, from
        self.s2 = np.einsum("ij,ij->j", x, x, dtype=np.float64)  # which any subset's stats follow by subtraction

    def rows_of(self, train: np.ndarray, val: np.ndarray) -> "PoolRows":
        return PoolRows(self, train, val)

    def logits(self, head: Head, mask: np.ndarray) -> np.ndarray | None:
        """A linear head's logits (sum(mask), C) of the rows in `mask` when they are one run of the pool (a CV
        fold's test rows): no copy, the head's standardisation folded into its weights. None otherwise."""
        pos = self.pos[mask]
        if len(head.layers) != 1 or not len(pos) or pos[0] < 0 or not (np.diff(pos) == 1).all():
            return None
        w, b = on_standardised(head, self)  # the head's map written on the pool's standardised rows
        return self.x[pos[0]:pos[-1] + 1] @ w.T + b


class PoolRows:
    """A fit's rows (`train`) as views of a Pool: blocks (x (r, D), y (r,)) with y = -1 on rows that are not the
    fit's (its early-stopping slice `val`), and the fit's standardisation (raw - mean) / scale written on the
    blocks' space as (x - shift) / ratio. Rows that the pool's runs cannot cover in a few views are copied."""

    def __init__(self, pool: Pool, train: np.ndarray, val: np.ndarray):
        fit, cover = pool.pos[train], pool.pos[train | val]
        if (cover < 0).any():
            raise ValueError("PoolRows: a fit's rows must be labelled rows of the pool")
        n, cover = len(fit), np.sort(cover)
        inside = np.zeros(len(pool.x), bool)
        inside[fit] = True
        out = pool.x[~inside]  # (m, D) the rows not in this fit (test fold, slice): the fit's stats by subtraction
        mu = (pool.s1 - out.sum(0, dtype=np.float64)) / max(n, 1)  # (D,) in the pool's standardised units
        var = np.maximum((pool.s2 - np.einsum("ij,ij->j", out, out, dtype=np.float64)) / max(n, 1) - mu ** 2, 0)
        self.mean = (pool.mean + pool.scale * mu).astype(np.float32)  # (D,) raw units, as Standardised's
        self.scale = robust_scale(pool.scale * np.sqrt(var))
        self.shift, self.ratio = mu.astype(np.float32), (self.scale / pool.scale).astype(np.float32)
        y = np.where(inside, pool.y, -1)  # -1: in a run, not in the fit (weight 0)
        cuts = np.flatnonzero(np.diff(cover) != 1) + 1
        if len(cuts) < 4:  # a CV fold: at most two runs
            self.blocks = [(pool.x[r[0]:r[-1] + 1], y[r[0]:r[-1] + 1]) for r in np.split(cover, cuts)]
        else:
            fit = np.sort(fit)
            self.blocks = [(pool.x[fit], pool.y[fit])]

    def __iter__(self):
        yield from self.blocks


def fit_head(*, rows: Rows, train: np.ndarray, val: np.ndarray, n_classes: int, params: HeadParams,
             random_state: int, pool: Pool | None = None, init: Head | None = None) -> Head:
    """Train one head on the rows where `train` is True (labels in [0, C)), early-stopping on the rows where `val`
    is True. Deterministic given random_state. `pool`: the labelled rows standardised once, for linear heads;
    `init`: a linear head to start a linear fit from (mean_linear_head)."""
    data = pool.rows_of(train, val) if pool is not None and not params.hidden else Standardised(rows, train)
    xv = (rows.take(val) - data.mean) / data.scale if val.any() else None  # (V, D)
    yv = np.maximum(rows.labels[val], 0)
    weight = class_weights(rows.labels[train], n_classes, params.class_weight)  # (C,)
    if params.hidden:
        from pipeline.mlp import fit_mlp  # torch, imported only for a hidden layer (1.7 s)
        layers = fit_mlp(data=data, xv=xv, yv=yv, weight=weight, n_classes=n_classes, params=params,
                         random_state=random_state)
    else:  # logistic regression: full-batch L-BFGS converges in tens of passes, Adam in hundreds
        layers = [_fit_linear(data, xv, yv, weight, n_classes, params, init)]
    return Head(layers, data.mean, data.scale)


def _weighted_ce(z: np.ndarray, y: np.ndarray, weight: np.ndarray, grad: bool = True):
    """Sum of class-weighted cross-entropy over a block and (grad) d(sum)/d(logits): logits (n, C), labels (n,).
    A label -1 takes weight[-1]: 0 where the caller appended a 0 (rows to ignore)."""
    m = z.max(1, keepdims=True)
    e = np.exp(z - m)  # (n, C)
    s = e.sum(1, keepdims=True)
    rows = np.arange(len(y))
    w = weight[y]  # (n,)
    loss = -float(np.dot(w.astype(np.float64), z[rows, y] - m[:, 0] - np.log(s[:, 0])))
    if not grad:
        return loss
    e /= s
    e[rows, y] -= 1
    return loss, e * w[:, None]


class _Softmax:
    """The linear head's objective for lbfgs: mean weighted cross-entropy of softmax(X W^T + b) + lam/2 |W|^2 (bias
    not penalised), theta = [W (C*D), b (C)]. Logits are linear in the step, Z(t) = Z + t dZ: a direction costs
    one pass over X (dZ = X dW^T), each line-search trial O(N C), the gradient at the accepted point one more pass
    (G^T X). Two passes per iteration however many trials; the accepted trial's loss and d/dlogits are reused.
    Holds Z, dZ and the last trial's logits and d/dlogits: 16 N C bytes. Blocks of a PoolRows are
    in another standardisation, (x - shift) / ratio in the fit's: the weights are mapped onto it (`_on_blocks`)."""

    def __init__(self, data, weight: np.ndarray, lam: float, n_cls: int, dim: int):
        self.data, self.lam, self.C, self.D = data, lam, n_cls, dim
        self.weight = np.append(weight, np.float32(0))  # (C + 1,): label -1 (a row to ignore) weighs 0
        self.shift, self.ratio = data.shift, data.ratio  # (D,) each, or None
        self.ys = [y for _, y in data]  # labels per block (a streamed store is read once for them)
        self.trial: tuple = (None, [], [])  # the last line-search trial: t, logits and (loss, d/dlogits) per block
        self.total = float(sum(self.weight[y].sum(dtype=np.float64) for y in self.ys))

    def split(self, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return theta[:self.C * self.D].reshape(self.C, self.D), theta[self.C * self.D:]  # W (C, D), b (C,)

    def _on_blocks(self, W: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(W, b) on the fit's standardised features -> the same map on the blocks': ((x - shift) / ratio) W^T + b
        = x (W / ratio)^T + (b - (W / ratio) shift)."""
        if self.shift is None:
            return W, b
        a = W / self.ratio  # (C, D)
        return a, b - a @ self.shift

    def _loss_grad(self, ce: list | None = None):
        """Loss and gradient at self.theta; `ce`: each block's (loss, d/dlogits) there, when already known."""
        W, _ = self.split(self.theta)
        loss, gw, gb = 0.0, np.zeros_like(W), np.zeros(self.C, np.float32)
        for i, ((x, y), z) in enumerate(zip(self.data, self.Z)):
            s, g = ce[i] if ce is not None else _weighted_ce(z, y, self.weight)  # g: (n, C)
            loss += s
            gw += g.T @ x  # (C, n) @ (n, D)
            gb += g.sum(0)
        if self.shift is not None:  # d/dW of x (W / ratio)^T - (W / ratio) shift
            gw = (gw - np.outer(gb, self.shift)) / self.ratio
        grad = np.concatenate([(gw / self.total + self.lam * W).ravel(), gb / self.total])
        return loss / self.total + 0.5 * self.lam * float(np.dot(W.ravel(), W.ravel())), grad

    def start(self, theta: np.ndarray):
        self.theta = theta
        if theta.any():
            a, c = self._on_blocks(*self.split(theta))
            self.Z = [x @ a.T + c for x, _ in self.data]  # (n, C) per block
        else:  # the usual start: the logits are the bias, 0; no pass over X
            self.Z = [np.zeros((len(y), self.C), np.float32) for y in self.ys]
        return self._loss_grad()

    def along(self, d: np.ndarray):
        self.d = d
        (W, _), (dW, db) = self.split(self.theta), self.split(d)
        da, dc = self._on_blocks(dW, db)  # linear in (dW, db): logits move along x da^T + dc
        self.dZ = [x @ da.T + dc for x, _ in self.data]
        ww, wd, dd = (float(np.dot(a.ravel(), b.ravel())) for a, b in ((W, W), (W, dW), (dW, dW)))

        def phi(t: float) -> tuple[float, float]:  # loss and slope at theta + t d: O(N C), no pass over X
            ce, slope, self.trial = 0.0, 0.0, (t, [], [])
            for z, dz, y in zip(self.Z, self.dZ, self.ys):
                zt = z + t * dz
                s, g = _weighted_ce(zt, y, self.weight)
                ce, slope = ce + s, slope + float(np.vdot(g, dz))
                self.trial[1].append(zt), self.trial[2].append((s, g))
            return (ce / self.total + 0.5 * self.lam * (ww + 2 * t * wd + t * t * dd),
                    slope / self.total + self.lam * (wd + t * dd))
        return phi

    def accept(self, t: float):
        self.theta = self.theta + t * self.d
        if self.trial[0] == t:  # the last trial is the step taken (the usual case): its logits and d/dlogits
            self.Z, ce = self.trial[1], self.trial[2]
        else:
            ce = None
            for z, dz in zip(self.Z, self.dZ):
                z += t * dz
        self.trial = (None, [], [])
        return self._loss_grad(ce)


def _fit_linear(data: Standardised | PoolRows, xv: np.ndarray | None, yv: np.ndarray, weight: np.ndarray, n_cls: int,
                params: HeadParams, init: Head | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial logistic regression by full-batch L-BFGS (as scikit-learn's LogisticRegression): objective
    mean weighted cross-entropy + weight_decay / 2 * |W|^2. Stops at convergence (GTOL), after `epochs` iterations
    (each about two passes over X), or early on the validation loss, checked after every iteration; the best point
    is kept. Starts at 0, or at the linear head `init` (the same map of raw features, on this fit's standardisation).
    -> (W (C, D), b (C,))."""
    problem = _Softmax(data, weight, params.weight_decay, n_cls, data.mean.shape[0])
    theta = np.zeros(n_cls * (problem.D + 1), np.float32) if init is None else \
        np.concatenate([v.ravel() for v in on_standardised(init, data)])
    stopper, best = _Stopper(params.patience, params.tol), {"loss": float("inf"), "theta": None}

    def check(theta: np.ndarray, it: int) -> bool:
        W, b = problem.split(theta)
        v = _weighted_ce(xv @ W.T + b, yv, weight, grad=False) / float(weight[yv].sum())
        if v < best["loss"]:
            best["loss"], best["theta"] = v, theta.copy()
        stopper.update(v)
        return stopper.stop

    theta = lbfgs(problem, theta, max_iter=params.epochs, gtol=GTOL, callback=check if xv is not None else None)
    W, b = problem.split(best["theta"] if best["theta"] is not None else theta)
    return W.copy(), b.copy()


def raw_map(head: Head) -> tuple[np.ndarray, np.ndarray]:
    """A linear head as one affine map of raw features: logits = x a^T + c, a (C, D), c (C,), float64."""
    (w, b), = head.layers
    a = w.astype(np.float64) / head.scale
    return a, b - a @ head.mean


def on_standardised(head: Head, space: Standardised | PoolRows | Pool) -> tuple[np.ndarray, np.ndarray]:
    """A linear head's map of raw features written on the standardisation (mean, scale) of `space`, float32:
    ((x - mean) / scale) W^T + b = x a^T + c  =>  W = a * scale (C, D), b = c + a mean (C,)."""
    a, c = raw_map(head)
    return (a * space.scale).astype(np.float32), (c + a @ space.mean).astype(np.float32)


def mean_linear_head(heads: list[Head]) -> Head | None:
    """The average of linear heads' maps of raw features, as a Head (mean 0, scale 1): where the final fit starts
    from when the CV heads converged without an early-stopping slice. None for heads with hidden layers."""
    if not heads or any(h.hidden for h in heads):
        return None
    maps = [raw_map(h) for h in heads]
    a, c = (np.mean([m[i] for m in maps], axis=0) for i in (0, 1))
    dim = a.shape[1]
    return Head([(a.astype(np.float32), c.astype(np.float32))], np.zeros(dim, np.float32), np.ones(dim, np.float32))


class _Stopper:
    """Early stopping: stop after `patience` checks without a new best, or once the best validation loss improved
    by less than `tol` (relative) over the last `patience` checks: converged. `improved` says whether the last
    check set a new best (the caller keeps that head)."""

    def __init__(self, patience: int, tol: float):
        self.patience, self.tol = patience, tol
        self.history: list[float] = []  # best loss after each check
        self.best_loss, self.bad, self.stop, self.improved = float("inf"), 0, False, False

    def update(self, loss: float) -> None:
        self.improved = loss < self.best_loss - 1e-6
        if self.improved:
            self.best_loss, self.bad = loss, 0
        else:
            self.bad += 1
        self.history.append(self.best_loss)
        converged = (len(self.history) > self.patience and
                     self.history[-1 - self.patience] - self.best_loss < self.tol * self.history[-1 - self.patience])
        self.stop = self.bad >= self.patience or converged


def head_logits(head: Head, rows: Rows, mask: np.ndarray | None = None, batch: int = 65536) -> np.ndarray:
    """Uncalibrated logits (sum(mask), C) of the rows where `mask` is True (all rows when None), in row order."""
    out = []
    for s, x in rows.blocks(mask):
        xs = x if mask is None else x[mask[s:s + len(x)]]
        for i in range(0, len(xs), batch):
            out.append(head.logits(xs[i:i + batch]))
    return np.concatenate(out) if out else np.zeros((0, head.layers[-1][0].shape[0]), np.float32)
