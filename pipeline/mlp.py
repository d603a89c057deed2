"""The head with hidden layers, trained in torch: Adam in mini-batches, one loop for in-memory and streamed rows,
early stopping on the validation slice. Imported only when `hidden` is not empty (torch's import is 1.7 s);
`TorchHead` wraps any fitted Head as a torch module for export."""
from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import torch
from torch import nn

from pipeline.head import Head, Standardised, _Stopper
from pipeline.params import HeadParams

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
    """[Linear + ReLU + Dropout] x len(hidden) -> Linear, on standardised features (B, D) -> logits (B, C)."""

    def __init__(self, dim: int, hidden: tuple[int, ...], n_classes: int, dropout: float):
        super().__init__()
        layers: list[nn.Module] = []
        width = dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(), Dropout(dropout)]
            width = h
        layers.append(nn.Linear(width, n_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def layers(self) -> list[tuple[np.ndarray, np.ndarray]]:
        return [(m.weight.detach().numpy().copy(), m.bias.detach().numpy().copy())
                for m in self.net if isinstance(m, nn.Linear)]


class Adam:
    """torch.optim.Adam's update (L2 weight decay added to the gradient, bias-corrected moments). Our own: the
    first use of any torch.optim optimizer imports torch._dynamo (1.5 s of every train-head)."""

    def __init__(self, params, *, lr: float, weight_decay: float, betas=(0.9, 0.999), eps: float = 1e-8):
        self.params = list(params)
        self.lr, self.wd, self.betas, self.eps, self.t = lr, weight_decay, betas, eps, 0
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        b1, b2 = self.betas
        c1, c2 = 1 - b1 ** self.t, math.sqrt(1 - b2 ** self.t)
        for p, m, v in zip(self.params, self.m, self.v):
            g = p.grad if self.wd == 0 else p.grad.add(p, alpha=self.wd)
            m.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            p.addcdiv_(m, v.sqrt().div_(c2).add_(self.eps), value=-self.lr / c1)


def _epoch(data: Standardised, bs: int, rng: np.random.Generator, gen: torch.Generator,
           window: int = 4) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """One epoch as (x (n, D) standardised, y (n,), shuffled positions to batch from) per window.
    In memory: one window, every row. Streamed: windows of `window` blocks in shuffled order; rows left over
    after the last full batch join the next window, so every batch has exactly `bs` rows (each new batch shape
    makes oneDNN build and cache new kernels)."""
    if data.cached is not None:
        x, y = data.cached[0]
        yield torch.from_numpy(x), torch.from_numpy(y), torch.randperm(len(y), generator=gen)
        return
    rows, train = data.rows, data.train
    starts = np.arange(0, len(rows), rows.block_rows)
    order = rng.permutation(len(starts))
    carry_x, carry_y = torch.zeros(0, rows.dim), torch.zeros(0, dtype=torch.int64)
    for w0 in range(0, len(order), window):
        m = np.zeros(len(rows), bool)
        for c in order[w0:w0 + window]:
            m[starts[c]:starts[c] + rows.block_rows] = train[starts[c]:starts[c] + rows.block_rows]
        x = torch.cat([carry_x, torch.from_numpy((rows.take(m) - data.mean) / data.scale)])  # (w, D)
        y = torch.cat([carry_y, torch.from_numpy(data.y_all[m])])
        pos = torch.from_numpy(rng.permutation(len(y)))
        full = len(y) // bs * bs
        carry_x, carry_y = x[pos[full:]], y[pos[full:]]  # dropped at the end of the epoch
        yield x, y, pos[:full]


def fit_mlp(*, data: Standardised, xv: np.ndarray | None, yv: np.ndarray, weight: np.ndarray, n_classes: int,
            params: HeadParams, random_state: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Adam on mini-batches of the standardised training rows; the layers of the best head on the validation
    slice. Without a slice: the last head, once the mean training loss of an epoch improved by less than `tol`
    over `patience` epochs (or after `epochs`). Deterministic given random_state."""
    rng = np.random.default_rng(random_state)
    gen = torch.Generator().manual_seed(random_state)
    n_train = int(data.train.sum())
    bs = max(1, min(params.batch_size, n_train))
    # Validate once per epoch, or every VAL_EVERY steps when epochs are longer: on large data the best
    # head often comes within the first epoch, and `patience` whole epochs would be mostly wasted.
    check_every = max(1, min(-(-n_train // bs), VAL_EVERY))
    xv_t = torch.from_numpy(xv) if xv is not None else None
    yv_t = torch.from_numpy(yv)
    with torch.random.fork_rng(devices=[]):  # init and dropout use torch's RNG: fork it, never seed globally
        torch.manual_seed(random_state)
        model = HeadNet(len(data.mean), params.hidden, n_classes, params.dropout)
        loss_fn = nn.CrossEntropyLoss(weight=torch.from_numpy(weight))
        opt = Adam(model.net.parameters(), lr=params.lr, weight_decay=params.weight_decay)
        stopper, best = _Stopper(params.patience, params.tol), None
        step = 0
        for _ in range(params.epochs):
            epoch_loss, epoch_steps = torch.zeros(()), 0
            for x, y, pos in _epoch(data, bs, rng, gen):
                for i in range(0, len(pos), bs):
                    b = pos[i:i + bs]
                    model.train()
                    opt.zero_grad()
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=BF16):
                        logits = model(x.index_select(0, b))
                    loss = loss_fn(logits.float(), y.index_select(0, b))
                    loss.backward()
                    opt.step()
                    step, epoch_steps = step + 1, epoch_steps + 1
                    epoch_loss += loss.detach()
                    if xv_t is not None and step % check_every == 0:
                        model.eval()
                        with torch.no_grad():
                            stopper.update(loss_fn(model(xv_t), yv_t).item())
                        if stopper.improved:
                            best = model.layers()
                        if stopper.stop:
                            break
                if stopper.stop:
                    break
            if xv_t is None and epoch_steps:  # no slice: stop once the training loss has converged (same rule)
                stopper.update(float(epoch_loss) / epoch_steps)
            if stopper.stop:
                break
    return best if best is not None else model.layers()


class TorchHead(nn.Module):
    """A fitted Head as a torch module: raw features (B, D) -> calibrated probabilities (B, C). For export."""

    def __init__(self, head: Head):
        super().__init__()
        self.net = HeadNet(len(head.mean), head.hidden, head.layers[-1][0].shape[0], 0.0).net
        linears = [m for m in self.net if isinstance(m, nn.Linear)]
        with torch.no_grad():
            for m, (w, b) in zip(linears, head.layers):
                m.weight.copy_(torch.from_numpy(w)), m.bias.copy_(torch.from_numpy(b))
        self.register_buffer("mean", torch.from_numpy(head.mean.copy()))  # (D,)
        self.register_buffer("scale", torch.from_numpy(head.scale.copy()))  # (D,)
        self.register_buffer("temperature", torch.tensor(float(head.temperature)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net((x - self.mean) / self.scale) / self.temperature, dim=1)
