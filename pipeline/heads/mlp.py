"""The head with hidden layers: [Linear + ReLU + Dropout] x len(hidden) -> Linear, trained in torch by Adam on
mini-batches, with early stopping on a validation slice. Imported only when a head has hidden layers (torch's
import is 1.7 s); the fitted head is numpy arrays (heads/head.py) like the linear one."""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch
from torch import nn

from pipeline.heads.common import Blocks, EarlyStopping, block_sizes, class_weights, standardise
from pipeline.heads.head import Head

# bf16 matmuls (fp32 weights and optimizer state) where the CPU has native bf16 (AVX-512-BF16 / AMX):
# ~1.7x faster head training (benchmarks/head_speed.py); inference stays fp32.
BF16 = bool(getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)())
VAL_EVERY = 50  # steps between validation checks, at most
MIN_CHECK_STEPS = 5  # steps between checks, at least: on small data an epoch is one or two mini-batches, too
# noisy under dropout to judge progress by (docs/benchmarks.md, "Stopping on small data")


@contextmanager
def one_thread():
    """torch on one intra-op thread inside: a mini-batch step is ~30 small ops (128 x 1280 x 256), and waking a
    second, sleeping thread (OMP_WAIT_POLICY=PASSIVE, features/__init__.py) for each costs more than it brings.
    On 2 cores a [256] fit took 0.69x the time of 2 threads, and stays as fast beside a busy process, where
    spinning threads took 3x (benchmarks/contention.py). The fitted head no longer depends on the
    machine's core count either. torch keeps the count per thread: fits side by side in threads each set their own."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class Dropout(nn.Dropout):
    """nn.Dropout with a uniform-threshold mask drawn from the fit's own generator: 2.5x faster than torch's
    bernoulli path on CPU here."""

    def __init__(self, p: float, generator: torch.Generator):
        super().__init__(p)
        self.generator = generator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        keep = torch.rand(x.shape, generator=self.generator, dtype=x.dtype) >= self.p
        return x * keep.to(x.dtype) * (1.0 / (1.0 - self.p))


class _Linear(nn.Linear):
    """nn.Linear created uninitialised (HeadNet initialises it from its generator): no draw from torch's global
    random state. Not device="meta" + to_empty, whose first use imports sympy, 0.35 s of a process."""

    def reset_parameters(self) -> None:
        pass


class HeadNet(nn.Module):
    """Standardised features (B, D) -> logits (B, C). Initialised as nn.Linear initialises itself, from
    `generator`: torch's global random state is neither read nor moved, so fits can run side by side in threads."""

    def __init__(self, dim: int, hidden: tuple[int, ...], n_classes: int, dropout: float,
                 generator: torch.Generator | None = None):
        super().__init__()
        generator = generator if generator is not None else torch.Generator().manual_seed(0)
        layers: list[nn.Module] = []
        width = dim
        for h in hidden:
            layers += [_Linear(width, h), nn.ReLU(), Dropout(dropout, generator)]
            width = h
        layers.append(_Linear(width, n_classes))
        self.net = nn.Sequential(*layers)
        with torch.no_grad():
            for m in self.net:
                if isinstance(m, nn.Linear):  # nn.Linear.reset_parameters, from the generator
                    nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5), generator=generator)
                    bound = 1 / math.sqrt(m.in_features)
                    nn.init.uniform_(m.bias, -bound, bound, generator=generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def layers(self) -> list[tuple[np.ndarray, np.ndarray]]:
        return [(m.weight.detach().numpy().copy(), m.bias.detach().numpy().copy())
                for m in self.net if isinstance(m, nn.Linear)]


class Adam:
    """torch.optim.Adam(fused=True)'s update (L2 weight decay added to the gradient, bias-corrected moments) by the
    same fused kernel, torch._fused_adam_, one call for every parameter: not torch.optim itself, whose first use
    imports torch._dynamo, 1.3 s of every train-head (benchmarks/solver_choice.py). The loop of tensor ops per
    parameter it replaces made an epoch 14% longer (35,887 rows, 2 cores); the head now trains as fast as a plain
    torch loop with torch.optim.Adam(fused=True) on the same tensors (benchmarks/mlp_step.py)."""

    def __init__(self, params, *, lr: float, weight_decay: float, betas=(0.9, 0.999), eps: float = 1e-8):
        self.params = list(params)
        self.lr, self.wd, self.betas, self.eps = lr, weight_decay, betas, eps
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.steps = [torch.zeros((), dtype=torch.float32) for _ in self.params]  # the kernel counts per parameter

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        torch._foreach_add_(self.steps, 1)
        torch._fused_adam_(self.params, [p.grad for p in self.params], self.m, self.v, [], self.steps, lr=self.lr,
                           beta1=self.betas[0], beta2=self.betas[1], weight_decay=self.wd, eps=self.eps,
                           amsgrad=False, maximize=False)


def _epoch(blocks: Blocks, y: np.ndarray, w: np.ndarray, bs: int, rng: np.random.Generator, gen: torch.Generator,
           window: int = 4) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """One epoch as (x (n, D), y (n,), sample weights (n,), shuffled positions to batch from) per window. One block (in memory): every
    row. Streamed: windows of `window` blocks in shuffled order; rows left over after the last full batch join
    the next window, so every batch has exactly `bs` rows (each new batch shape makes oneDNN build new kernels)."""
    if len(blocks) == 1:
        yield torch.from_numpy(blocks[0]), torch.from_numpy(y), torch.from_numpy(w), torch.randperm(len(y), generator=gen)
        return
    ends = np.cumsum([0] + block_sizes(blocks))  # (len + 1,) row offsets
    order = rng.permutation(len(blocks))
    carry = None  # (x, y, w) rows left from the last window
    for w0 in range(0, len(order), window):
        picked = sorted(order[w0:w0 + window])
        part = [torch.from_numpy(np.concatenate([blocks[c] for c in picked])),  # (r, D)
                *(torch.from_numpy(np.concatenate([v[ends[c]:ends[c + 1]] for c in picked])) for v in (y, w))]
        x, yw, ww = part if carry is None else (torch.cat([a, b]) for a, b in zip(carry, part))
        pos = torch.from_numpy(rng.permutation(len(yw)))
        full = len(yw) // bs * bs
        carry = (x[pos[full:]], yw[pos[full:]], ww[pos[full:]])  # dropped at the end of the epoch
        yield x, yw, ww, pos[:full]


def _minibatches(blocks: Blocks, y: np.ndarray, w: np.ndarray, bs: int, epochs: int, rng: np.random.Generator,
                 gen: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]]:
    """Every mini-batch of `epochs` epochs in training order: (x (bs, D), y (bs,), sample weights (bs,), whether it
    is the last of its epoch). Shuffled as _epoch shuffles; read one ahead, to know which batch ends an epoch."""
    for _ in range(epochs):
        ahead = None
        for x, yw, ww, pos in _epoch(blocks, y, w, bs, rng, gen):
            for i in range(0, len(pos), bs):
                if ahead is not None:
                    yield (*ahead, False)
                b = pos[i:i + bs]
                ahead = (x.index_select(0, b), yw.index_select(0, b), ww.index_select(0, b))
        if ahead is not None:
            yield (*ahead, True)


class SeenLoss:
    """The mean training loss per row since it was last taken: each step adds its batch's mean loss times its
    rows. Per row, not per batch: 133 rows are batches of 128 and 5, and the 5 rows' loss weighed as much as the
    128's stopped the head after 16-48 steps at 0.66-0.88 training accuracy."""

    def __init__(self):
        self.total, self.rows = 0.0, 0

    def add(self, batch_mean, rows: int) -> None:
        self.total, self.rows = self.total + batch_mean * rows, self.rows + rows

    def take(self) -> float:
        mean = float(self.total) / self.rows
        self.total, self.rows = 0.0, 0
        return mean


def _weighted_loss(logits: torch.Tensor, y: torch.Tensor, w: torch.Tensor, weight: torch.Tensor, loss_fn,
                   weighted: bool) -> torch.Tensor:
    """The class-weighted mean cross-entropy (CrossEntropyLoss's), times each row's sample weight when given."""
    if not weighted:
        return loss_fn(logits, y)
    s = weight[y] * w  # (bs,) class weight x sample weight
    return (nn.functional.cross_entropy(logits, y, reduction="none") * s).sum() / s.sum()


class MLPHead:
    """fit(X, y) -> self; then predict_proba(X), and the fitted `head_` (a Head), `mean_`, `scale_`, `n_steps_`.
    Adam on mini-batches of the standardised rows; with `val`, the head that was best on it (checked once per
    epoch, or every VAL_EVERY steps on long epochs); without, the last one, once the mean training loss (of whole
    epochs, at least MIN_CHECK_STEPS steps) improved by less than `tol` over `patience` checks (or after `epochs`).
    Deterministic given random_state, from its own generators: torch's global RNG is neither read nor moved, and
    fits may run side by side in threads."""

    def __init__(self, *, n_classes: int, hidden: tuple[int, ...] = (256,), dropout: float = 0.3, lr: float = 1e-3,
                 weight_decay: float = 1e-4, epochs: int = 60, batch_size: int = 128, patience: int = 3,
                 tol: float = 0.01, class_weight: str = "balanced", random_state: int = 0):
        self.n_classes, self.hidden, self.dropout, self.lr, self.weight_decay = n_classes, hidden, dropout, lr, weight_decay
        self.epochs, self.batch_size, self.patience, self.tol = epochs, batch_size, patience, tol
        self.class_weight, self.random_state = class_weight, random_state

    def fit(self, X: np.ndarray | Blocks, y: np.ndarray, sample_weight: np.ndarray | None = None,
            val: tuple[np.ndarray, np.ndarray] | None = None, copy: bool = True, stop=None) -> "MLPHead":
        """stop(): asked at each check; True ends the fit there (its CV gave up: the head is discarded)."""
        C, seed = self.n_classes, self.random_state
        blocks, self.mean_, self.scale_ = standardise(X, copy=copy)
        weight = torch.from_numpy(class_weights(y, C, self.class_weight))  # (C,)
        sw = np.ones(len(y), np.float32) if sample_weight is None else np.asarray(sample_weight, np.float32)
        bs = max(1, min(self.batch_size, len(y)))
        gen = torch.Generator().manual_seed(seed)  # the shuffles, the initial weights and dropout's masks
        batches = _minibatches(blocks, np.asarray(y, np.int64), sw, bs, self.epochs, np.random.default_rng(seed), gen)
        # What is checked, and when: the loss on `val` once per epoch, or every VAL_EVERY steps when epochs are
        # longer (on large data the best head often comes within the first epoch); without `val`, the mean
        # training loss per row since the last check (SeenLoss), at the end of an epoch. Either way
        # MIN_CHECK_STEPS steps apart.
        check_every = max(MIN_CHECK_STEPS, min(-(-len(y) // bs), VAL_EVERY))
        xv = torch.from_numpy((np.asarray(val[0], np.float32) - self.mean_) / self.scale_) \
            if val is not None and len(val[1]) else None  # (V, D)
        yv = torch.from_numpy(np.asarray(val[1])) if xv is not None else None
        with one_thread():
            model = HeadNet(len(self.mean_), tuple(self.hidden), C, self.dropout, generator=gen)
            opt = Adam(model.net.parameters(), lr=self.lr, weight_decay=self.weight_decay)
            loss_fn = nn.CrossEntropyLoss(weight=weight)
            stopper, best, step = EarlyStopping(self.patience, self.tol, of_first=xv is None), None, 0
            seen, last_check, capped = SeenLoss(), 0, False
            for xb, yb, wb, epoch_ends in batches:
                # one Adam step on a mini-batch (bs, D)
                model.train()
                opt.zero_grad()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=BF16):
                    logits = model(xb)  # (bs, C)
                loss = _weighted_loss(logits.float(), yb, wb, weight, loss_fn, sample_weight is not None)
                loss.backward()
                opt.step()
                step = step + 1
                seen.add(loss.detach(), len(yb))
                # a check now? then the one stop rule (EarlyStopping): no new best for `patience` checks, or converged
                checked = None
                if xv is not None and step % check_every == 0:
                    model.eval()
                    with torch.no_grad():
                        checked = loss_fn(model(xv), yv).item()
                elif xv is None and epoch_ends and step - last_check >= MIN_CHECK_STEPS:
                    checked = seen.take()
                if checked is not None:
                    last_check = step
                    stopper.update(checked)
                    if xv is not None and stopper.improved:
                        best = model.layers()  # with `val`, the head that was best on it is kept
                    if stopper.stop or (stop is not None and stop()):
                        break
            else:  # every epoch ran: the stop rule never decided
                capped = True
        self.n_steps_ = step
        self.head_ = Head(best if best is not None else model.layers(), self.mean_, self.scale_, capped=capped)
        return self

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return self.head_(X)

