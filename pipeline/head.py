"""The dense softmax head and its fit, for features in memory or streamed from the store:
standardise -> [Linear + ReLU + Dropout] x len(hidden) -> Linear -> softmax cross-entropy, with weight decay and
early stopping on a held-out slice once the validation loss stops improving by `tol`. Hidden layers: Adam in
mini-batches (one loop for in-memory and streamed rows). No hidden layer (`hidden: []`, multinomial logistic
regression): full-batch L-BFGS, as scikit-learn's LogisticRegression.

Everything the head needs at inference (standardisation stats, temperature) is a buffer of the module,
so `head.pt` is one plain state dict, loadable with `weights_only=True`.
"""
from __future__ import annotations

import copy
from typing import Iterator

import numpy as np
import torch
from torch import nn

from pipeline.optim import Adam, lbfgs
from pipeline.params import HeadParams
from pipeline.rows import Rows

# bf16 matmuls (fp32 weights and optimizer state) where the CPU has native bf16 (AVX-512-BF16 / AMX):
# ~1.7x faster head training, measured in benchmarks/head_speed.py; inference stays fp32.
BF16 = bool(getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)())
VAL_EVERY = 50  # steps between validation checks, at most


class Dropout(nn.Dropout):
    """nn.Dropout with a uniform-threshold mask: 2.5x faster than torch's bernoulli path on CPU here."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        return x * (torch.rand_like(x) >= self.p).to(x.dtype) * (1.0 / (1.0 - self.p))


class HeadNet(nn.Module):
    def __init__(self, dim: int, hidden: tuple[int, ...], n_classes: int, dropout: float):
        super().__init__()
        layers: list[nn.Module] = []
        width = dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(), Dropout(dropout)]
            width = h
        layers.append(nn.Linear(width, n_classes))
        self.net = nn.Sequential(*layers)
        self.register_buffer("mean", torch.zeros(dim))  # (D,)
        self.register_buffer("scale", torch.ones(dim))  # (D,)
        self.register_buffer("temperature", torch.ones(()))  # fitted on out-of-fold logits
        self.register_buffer("card", torch.zeros(32, dtype=torch.uint8))  # sha256 of the model card it was saved with
        self.fitted = False  # set by fit_head and by a validated load: an unfitted head refuses to predict

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Raw features (B, D) -> uncalibrated logits (B, C)."""
        if not self.fitted:
            raise RuntimeError("this head is not fitted: train it with fit_head or load it from a model directory")
        return self.net((x - self.mean) / self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Raw features (B, D) -> calibrated probabilities (B, C)."""
        return torch.softmax(self.logits(x) / self.temperature, dim=1)


def robust_scale(std: torch.Tensor) -> torch.Tensor:
    """Per-dimension divisor for standardisation. Dimensions (nearly) constant in training would be blown up
    by 1/std when they move at test time (another style, another camera): never amplify one more than 10x
    the typical dimension."""
    return std.clamp_min(0.1 * float(std.mean()) + 1e-12)


def class_weights(labels: np.ndarray, n_classes: int, mode: str) -> torch.Tensor:
    if mode == "none":
        return torch.ones(n_classes)
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    w = np.where(counts > 0, len(labels) / (n_classes * np.maximum(counts, 1)), 0.0)
    return torch.tensor(w, dtype=torch.float32)


def split_validation(*, labels: np.ndarray, train: np.ndarray, params: HeadParams, random_state: int,
                     max_rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(fit mask, validation mask) carved from `train`: a stratified `val_fraction` slice, or none when it would
    hold fewer than `min_val_images` (a slice of a few dozen images stops training at noise)."""
    idx = np.flatnonzero(train)
    n_val = int(round(params.val_fraction * len(idx)))
    val = np.zeros(len(labels), bool)
    if params.val_fraction == 0 or n_val < params.min_val_images:
        return train.copy(), val
    rng = np.random.default_rng(random_state)
    y = labels[idx]
    picked = []
    for c in np.unique(y):  # stratified: the same fraction of every class
        members = rng.permutation(idx[y == c])
        picked.append(members[:int(round(params.val_fraction * len(members)))])
    chosen = np.concatenate(picked)
    if max_rows is not None and len(chosen) > max_rows:  # streamed stores: the slice must fit in memory
        chosen = rng.choice(chosen, max_rows, replace=False)
    val[chosen] = True
    return train & ~val, val


def _stats(rows: Rows, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and robust scale (D,) over the rows in `mask` of a streamed store: one pass, blocks combined exactly
    (Chan et al.)."""
    n, mean, m2 = 0, torch.zeros(rows.dim, dtype=torch.float64), torch.zeros(rows.dim, dtype=torch.float64)
    for s, x in rows.blocks(mask):
        xb = torch.from_numpy(x[mask[s:s + len(x)]])
        if not len(xb):
            continue
        var_b, mean_b = torch.var_mean(xb, 0, correction=0)
        nb = len(xb)
        delta = mean_b.double() - mean
        tot = n + nb
        mean = mean + delta * nb / tot
        m2 = m2 + var_b.double() * nb + delta ** 2 * n * nb / tot
        n = tot
    return mean.float(), robust_scale((m2 / max(n, 1)).sqrt().float())


def _epoch(rows: Rows, train: np.ndarray, mean: torch.Tensor, scale: torch.Tensor, y_all: torch.Tensor,
           cached: tuple[torch.Tensor, torch.Tensor] | None, bs: int, rng: np.random.Generator,
           gen: torch.Generator, window: int = 4) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """One epoch as (x (n, D) standardised, y (n,), shuffled positions to batch from) per window.
    In memory: one window, every row. Streamed: windows of `window` blocks in shuffled order; rows left over
    after the last full batch join the next window, so every batch has exactly `bs` rows (each new batch shape
    makes oneDNN build and cache new kernels)."""
    if cached is not None:
        yield cached[0], cached[1], torch.randperm(len(cached[1]), generator=gen)
        return
    starts = np.arange(0, len(rows), rows.block_rows)
    order = rng.permutation(len(starts))
    carry_x, carry_y = torch.zeros(0, rows.dim), torch.zeros(0, dtype=torch.int64)
    for w0 in range(0, len(order), window):
        m = np.zeros(len(rows), bool)
        for c in order[w0:w0 + window]:
            m[starts[c]:starts[c] + rows.block_rows] = train[starts[c]:starts[c] + rows.block_rows]
        x = torch.cat([carry_x, (torch.from_numpy(rows.take(m)) - mean) / scale])  # (w, D)
        y = torch.cat([carry_y, y_all[torch.from_numpy(np.flatnonzero(m))]])
        pos = torch.from_numpy(rng.permutation(len(y)))
        full = len(y) // bs * bs
        carry_x, carry_y = x[pos[full:]], y[pos[full:]]  # dropped at the end of the epoch
        yield x, y, pos[:full]


def fit_head(*, rows: Rows, train: np.ndarray, val: np.ndarray, n_classes: int, params: HeadParams,
             random_state: int) -> HeadNet:
    """Train one head on the rows where `train` is True (labels in [0, C)), early-stopping on the rows where `val`
    is True. One loop for in-memory and streamed rows. Deterministic given random_state."""
    rng = np.random.default_rng(random_state)
    gen = torch.Generator().manual_seed(random_state)
    y_all = torch.from_numpy(np.maximum(rows.labels, 0))  # (N,)
    cached = None
    if rows.in_memory:  # one copy of the training rows: stats from it, then standardised in place
        idx = torch.from_numpy(np.flatnonzero(train))
        xt = torch.from_numpy(rows.features[idx.numpy()])  # (T, D)
        var, mean = torch.var_mean(xt, 0, correction=0)
        scale = robust_scale(var.sqrt())
        cached = xt.sub_(mean).div_(scale), y_all[idx]
    else:
        mean, scale = _stats(rows, train)
    xv = (torch.from_numpy(rows.take(val)) - mean) / scale if val.any() else None  # (V, D)
    yv = y_all[torch.from_numpy(np.flatnonzero(val))]
    n_train = int(train.sum())
    bs = max(1, min(params.batch_size, n_train))
    # Validate once per epoch, or every VAL_EVERY steps when epochs are longer: on large data the best
    # head often comes within the first epoch, and `patience` whole epochs would be mostly wasted.
    check_every = max(1, min(-(-n_train // bs), VAL_EVERY))
    weight = class_weights(rows.labels[train], n_classes, params.class_weight)  # (C,)
    if not params.hidden:  # logistic regression: full-batch L-BFGS converges in tens of passes, Adam in hundreds
        model = HeadNet(rows.dim, (), n_classes, 0.0)
        model.mean.copy_(mean), model.scale.copy_(scale)
        _fit_linear(model.net[0], _full_batch(rows, train, mean, scale, y_all, cached), xv, yv, weight, params)
        model.fitted = True
        return model.eval()
    with torch.random.fork_rng(devices=[]):  # init and dropout use torch's RNG: fork it, never seed globally
        torch.manual_seed(random_state)
        model = HeadNet(rows.dim, params.hidden, n_classes, params.dropout)
        model.mean.copy_(mean), model.scale.copy_(scale)
        loss_fn = nn.CrossEntropyLoss(weight=weight)
        opt = Adam(model.net.parameters(), lr=params.lr, weight_decay=params.weight_decay)
        stopper = _Stopper(params.patience, params.tol)
        step = 0
        for _ in range(params.epochs):
            for x, y, pos in _epoch(rows, train, mean, scale, y_all, cached, bs, rng, gen):
                for i in range(0, len(pos), bs):
                    b = pos[i:i + bs]
                    model.train()
                    opt.zero_grad()
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=BF16):
                        logits = model.net(x.index_select(0, b))
                    loss_fn(logits.float(), y.index_select(0, b)).backward()
                    opt.step()
                    step += 1
                    if xv is not None and step % check_every == 0:
                        model.eval()
                        with torch.no_grad():
                            stopper.update(loss_fn(model.net(xv), yv).item(), model)
                        if stopper.stop:
                            break
                if stopper.stop:
                    break
            if stopper.stop:
                break
    if stopper.best is not None:
        model.net.load_state_dict(stopper.best)
    model.fitted = True
    return model.eval()


def _full_batch(rows: Rows, train: np.ndarray, mean: torch.Tensor, scale: torch.Tensor, y_all: torch.Tensor,
                cached: tuple[torch.Tensor, torch.Tensor] | None):
    """A re-iterable over the whole training set as standardised (x (n, D), y (n,)) blocks: one block in memory,
    the store's blocks when streamed."""
    if cached is not None:
        return [cached]

    class Blocks:
        def __iter__(self):
            for s, x in rows.blocks(train):
                m = train[s:s + len(x)]
                if m.any():
                    yield (torch.from_numpy(x[m]) - mean) / scale, y_all[s:s + len(x)][torch.from_numpy(m)]
    return Blocks()


def _weighted_ce(z: torch.Tensor, y: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of class-weighted cross-entropy over a block and d(sum)/d(logits): logits (n, C), labels (n,)."""
    logp = torch.log_softmax(z, 1)  # (n, C)
    w = weight[y]  # (n,)
    g = logp.exp()
    g[torch.arange(len(y)), y] -= 1
    return -(w * logp.gather(1, y[:, None])[:, 0]).sum(), g.mul_(w[:, None])


def _fit_linear(lin: nn.Linear, batches, xv: torch.Tensor | None, yv: torch.Tensor, weight: torch.Tensor,
                params: HeadParams) -> None:
    """Multinomial logistic regression by full-batch L-BFGS (as scikit-learn's LogisticRegression): objective
    mean weighted cross-entropy + weight_decay / 2 * |W|^2 (bias not penalised). Gradients by hand (G^T X is 4x
    faster than autograd's X^T G on CPU). Stops at convergence, after `epochs` iterations (each one full pass, like
    an epoch), or early on the validation loss, checked after every iteration; the best point is kept."""
    n_cls, dim = lin.weight.shape
    total_w = float(sum(weight[y].sum() for _, y in batches))
    lam = params.weight_decay

    def unpack(theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return theta[:n_cls * dim].view(n_cls, dim), theta[n_cls * dim:]  # W (C, D), b (C,)

    def objective(theta: torch.Tensor) -> tuple[float, torch.Tensor]:
        W, b = unpack(theta)
        loss, gw, gb = 0.0, torch.zeros_like(W), torch.zeros_like(b)
        for x, y in batches:
            s, g = _weighted_ce(torch.addmm(b, x, W.T), y, weight)  # g: (n, C)
            loss += float(s)
            gw.addmm_(g.T, x), gb.add_(g.sum(0))  # (C, n) @ (n, D): the fast layout
        grad = torch.cat([gw.div_(total_w).add_(W, alpha=lam).flatten(), gb.div_(total_w)])
        return loss / total_w + 0.5 * lam * float(W.double().pow(2).sum()), grad

    stopper, best = _Stopper(params.patience, params.tol), {"loss": float("inf"), "theta": None}

    def check(theta: torch.Tensor, it: int) -> bool:
        W, b = unpack(theta)
        v = float(nn.functional.cross_entropy(torch.addmm(b, xv, W.T), yv, weight=weight))
        if v < best["loss"]:
            best["loss"], best["theta"] = v, theta.clone()
        stopper.update_value(v)
        return stopper.stop

    theta = lbfgs(objective, torch.zeros(n_cls * (dim + 1)), max_iter=params.epochs,
                  callback=check if xv is not None else None)
    W, b = unpack(best["theta"] if best["theta"] is not None else theta)
    with torch.no_grad():
        lin.weight.copy_(W), lin.bias.copy_(b)


class _Stopper:
    """Early stopping: keep the best head; stop after `patience` checks without a new best, or once the best
    validation loss improved by less than `tol` (relative) over the last `patience` checks: converged."""

    def __init__(self, patience: int, tol: float):
        self.patience, self.tol = patience, tol
        self.history: list[float] = []  # best loss after each check
        self.best, self.best_loss, self.bad, self.stop = None, float("inf"), 0, False

    def update(self, loss: float, model: HeadNet) -> None:
        if loss < self.best_loss - 1e-6:
            self.best = copy.deepcopy(model.net.state_dict())
        self.update_value(loss)

    def update_value(self, loss: float) -> None:
        if loss < self.best_loss - 1e-6:
            self.best_loss, self.bad = loss, 0
        else:
            self.bad += 1
        self.history.append(self.best_loss)
        converged = (len(self.history) > self.patience and
                     self.history[-1 - self.patience] - self.best_loss < self.tol * self.history[-1 - self.patience])
        self.stop = self.bad >= self.patience or converged


@torch.no_grad()
def head_logits(head: HeadNet, rows: Rows, mask: np.ndarray | None = None, batch: int = 65536) -> np.ndarray:
    """Uncalibrated logits (sum(mask), C) of the rows where `mask` is True (all rows when None), in row order."""
    out = []
    for s, x in rows.blocks(mask):
        xs = x if mask is None else x[mask[s:s + len(x)]]
        for i in range(0, len(xs), batch):
            out.append(head.logits(torch.from_numpy(np.ascontiguousarray(xs[i:i + batch]))).numpy())
    return np.concatenate(out) if out else np.zeros((0, head.net[-1].out_features), np.float32)
