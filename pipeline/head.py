"""The dense softmax head and its one fit loop, for features in memory or streamed from the store:
standardise -> [Linear + ReLU + Dropout] x len(hidden) -> Linear -> softmax cross-entropy, Adam with
weight decay, early stopping on a held-out slice once the validation loss stops improving by `tol`.

Everything the head needs at inference (standardisation stats, temperature) is a buffer of the module,
so `head.pt` is one plain state dict, loadable with `weights_only=True`.
"""
from __future__ import annotations

import copy
from typing import Iterator

import numpy as np
import torch
from torch import nn

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
    with torch.random.fork_rng(devices=[]):  # init and dropout use torch's RNG: fork it, never seed globally
        torch.manual_seed(random_state)
        model = HeadNet(rows.dim, params.hidden, n_classes, params.dropout)
        model.mean.copy_(mean), model.scale.copy_(scale)
        loss_fn = nn.CrossEntropyLoss(weight=class_weights(rows.labels[train], n_classes, params.class_weight))
        opt = torch.optim.Adam(model.net.parameters(), lr=params.lr, weight_decay=params.weight_decay, foreach=True)
        stopper = _Stopper(params.patience, params.tol)
        step = 0
        for _ in range(params.epochs):
            for x, y, pos in _epoch(rows, train, mean, scale, y_all, cached, bs, rng, gen):
                for i in range(0, len(pos), bs):
                    b = pos[i:i + bs]
                    model.train()
                    opt.zero_grad(set_to_none=True)
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


class _Stopper:
    """Early stopping: keep the best head; stop after `patience` checks without a new best, or once the best
    validation loss improved by less than `tol` (relative) over the last `patience` checks: converged."""

    def __init__(self, patience: int, tol: float):
        self.patience, self.tol = patience, tol
        self.history: list[float] = []  # best loss after each check
        self.best, self.best_loss, self.bad, self.stop = None, float("inf"), 0, False

    def update(self, loss: float, model: HeadNet) -> None:
        if loss < self.best_loss - 1e-6:
            self.best_loss, self.bad, self.best = loss, 0, copy.deepcopy(model.net.state_dict())
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


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """Temperature scaling (Guo et al. 2017): the T > 0 minimising NLL of softmax(logits / T)."""
    z = torch.from_numpy(logits.astype(np.float32))
    y = torch.from_numpy(labels.astype(np.int64))
    log_t = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    t = float(log_t.detach().exp())
    return t if np.isfinite(t) and 0.01 < t < 100 else 1.0


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = logits / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)
