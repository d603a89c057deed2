"""The dense softmax head on cached embeddings: standardise -> [Linear + ReLU + Dropout] x len(hidden)
-> Linear -> softmax cross-entropy, Adam with weight decay, early stopping on a held-out slice.

Everything the head needs at inference (standardisation stats, temperature) is a buffer of the module,
so `head.pt` is one plain state dict, loadable with `weights_only=True`.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
from sklearn.model_selection import train_test_split
from torch import nn

from pipeline.params import HeadParams


# bf16 matmuls (fp32 weights and optimizer state) where the CPU has native bf16 (AVX-512-BF16 / AMX):
# ~1.7x faster head training, measured in benchmarks/head_speed.py; inference stays fp32.
VAL_EVERY = 50  # steps between validation checks, at most
BF16 = bool(getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)())


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

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Raw features (B, D) -> uncalibrated logits (B, C)."""
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


def fit_head(*, features: np.ndarray, labels: np.ndarray, n_classes: int, params: HeadParams,
             random_state: int) -> HeadNet:
    """Train one head on features (N, D) float32 and labels (N,) in [0, C). Deterministic given random_state."""
    gen = torch.Generator().manual_seed(random_state)
    idx_train, idx_val = np.arange(len(labels)), np.arange(0)
    n_val = int(round(params.val_fraction * len(labels)))
    # A validation slice of a few dozen images makes early stopping noise (it stops at the first wobble),
    # so below `min_val_images` the head trains for `epochs` on every training image.
    if params.val_fraction > 0 and n_val >= params.min_val_images:
        counts = np.bincount(labels, minlength=n_classes)
        strat = labels if counts[counts > 0].min() >= 2 else None
        if n_val < len(labels) - n_classes:
            idx_train, idx_val = train_test_split(np.arange(len(labels)), test_size=n_val, stratify=strat,
                                                  random_state=random_state)
    x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))  # (N, D)
    y = torch.from_numpy(labels.astype(np.int64))  # (N,)
    # Init and dropout draw from torch's global RNG: fork it so random_state is explicit and the caller's
    # RNG state is left untouched (no global seeding).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(random_state)
        model = HeadNet(x.shape[1], params.hidden, n_classes, params.dropout)
        xt, xv = x[idx_train], x[idx_val]  # the only copies of the features this fit makes
        var, mean = torch.var_mean(xt, 0, correction=0)  # one pass, (D,) each
        scale = robust_scale(var.sqrt())
        model.mean.copy_(mean), model.scale.copy_(scale)
        xt.sub_(mean).div_(scale), xv.sub_(mean).div_(scale)  # the module re-applies this to raw inputs
        yt, yv = y[idx_train], y[idx_val]
        loss_fn = nn.CrossEntropyLoss(weight=class_weights(labels[idx_train], n_classes, params.class_weight))
        opt = torch.optim.Adam(model.net.parameters(), lr=params.lr, weight_decay=params.weight_decay, foreach=True)
        best, best_loss, bad, step = None, float("inf"), 0, 0
        # Validate once per epoch, or every VAL_EVERY steps when epochs are longer: on large data the best
        # head often comes within the first epoch, and `patience` whole epochs would be mostly wasted.
        steps_per_epoch = -(-len(xt) // params.batch_size)
        check_every = min(steps_per_epoch, VAL_EVERY)
        stop = False
        for _epoch in range(params.epochs):
            order = torch.randperm(len(xt), generator=gen)
            for i in range(0, len(xt), params.batch_size):
                model.train()
                b = order[i:i + params.batch_size]
                opt.zero_grad(set_to_none=True)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=BF16):
                    logits = model.net(xt.index_select(0, b))
                loss_fn(logits.float(), yt.index_select(0, b)).backward()
                opt.step()
                step += 1
                if len(xv) and step % check_every == 0:
                    model.eval()
                    with torch.no_grad():
                        val = loss_fn(model.net(xv), yv).item()
                    if val < best_loss - 1e-4:
                        best_loss, bad, best = val, 0, copy.deepcopy(model.net.state_dict())
                    else:
                        bad += 1
                        stop = bad >= params.patience
                if stop:
                    break
            if stop:
                break
    if best is not None:
        model.net.load_state_dict(best)
    return model.eval()


@torch.no_grad()
def head_logits(model: HeadNet, features: np.ndarray, batch: int = 65536) -> np.ndarray:
    """Raw features (N, D) -> uncalibrated logits (N, C)."""
    x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    return torch.cat([model.logits(x[i:i + batch]) for i in range(0, len(x), batch)] or
                     [torch.empty(0, model.net[-1].out_features)]).numpy()


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
