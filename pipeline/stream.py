"""Head training for stores larger than memory: features are read chunk by chunk, never all at once.

- Folds and the early-stopping slice are assigned by image content hash, so no fold needs random access
  to the whole file and re-runs give the same split.
- Standardisation: one streaming pass collects per-fold sums; a fold's training stats are total - fold.
- Each epoch visits the HDF5 chunks in a shuffled order and shuffles rows within a window of chunks.
Peak memory is O(window x chunk rows x D), whatever the store size.
"""
from __future__ import annotations

import copy

import h5py
import numpy as np
import torch
from torch import nn

from pipeline.head import BF16, HeadNet, class_weights, robust_scale
from pipeline.params import HeadParams


def memory_budget(budget_mb: int) -> int:
    """Bytes of features the in-memory path may hold: the params value, or a quarter of available RAM."""
    if budget_mb > 0:
        return budget_mb << 20
    import psutil
    return int(psutil.virtual_memory().available * 0.25)


def feature_bytes(path: str) -> int:
    with h5py.File(path, "r") as f:
        n, d = f["features"].shape
    return n * d * 4  # float32 in memory, whatever the stored dtype


def hash_bucket(sha256: list[str], modulo: int, *, salt: int = 0) -> np.ndarray:
    """Stable bucket in [0, modulo) per image from its content hash (salt picks independent hex digits)."""
    return np.array([int(s[salt * 8:salt * 8 + 8], 16) % modulo for s in sha256], dtype=np.int64)


class Chunks:
    """Row blocks of one store's features, `rows` at a time (aligned to the HDF5 chunking)."""

    def __init__(self, path: str, rows: int = 8192):
        self.path = path
        with h5py.File(path, "r") as f:
            ds = f["features"]
            self.n, self.dim = ds.shape
            step = ds.chunks[0] if ds.chunks else rows
        self.rows = max(step, rows // step * step)  # whole HDF5 chunks: each is read (decompressed) once
        self.starts = list(range(0, self.n, self.rows))

    def read(self, f: h5py.File, start: int) -> np.ndarray:
        return f["features"][start:start + self.rows].astype(np.float32)  # (r, D)


def stream_stats(chunks: Chunks, fold: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-fold (count (k,), sum (k, D), sum of squares (k, D)) in float64, one pass over the store."""
    cnt, s1, s2 = np.zeros(k), np.zeros((k, chunks.dim)), np.zeros((k, chunks.dim))
    with h5py.File(chunks.path, "r") as f:
        for start in chunks.starts:
            x = chunks.read(f, start).astype(np.float64)
            fo = fold[start:start + len(x)]
            for j in range(k):
                m = fo == j
                cnt[j] += m.sum()
                s1[j] += x[m].sum(0)
                s2[j] += (x[m] ** 2).sum(0)
    return cnt, s1, s2


def fit_head_streaming(*, chunks: Chunks, labels: np.ndarray, train: np.ndarray, val: np.ndarray,
                       mean: np.ndarray, std: np.ndarray, n_classes: int, params: HeadParams, random_state: int,
                       window: int = 4) -> HeadNet:
    """Like head.fit_head, on rows where `train` is True; early stopping per epoch on rows where `val` is True."""
    rng = np.random.default_rng(random_state)
    bs = max(1, min(params.batch_size, int(train.sum())))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(random_state)
        model = HeadNet(chunks.dim, params.hidden, n_classes, params.dropout)
        model.mean.copy_(torch.from_numpy(mean.astype(np.float32)))
        model.scale.copy_(robust_scale(torch.from_numpy(std.astype(np.float32))))
        loss_fn = nn.CrossEntropyLoss(weight=class_weights(labels[train], n_classes, params.class_weight))
        opt = torch.optim.Adam(model.net.parameters(), lr=params.lr, weight_decay=params.weight_decay, foreach=True)
        best, best_loss, bad = None, float("inf"), 0
        with h5py.File(chunks.path, "r") as f:
            for _epoch in range(params.epochs):
                model.train()
                order = rng.permutation(len(chunks.starts))
                # Rows left over after the last full batch of a window are carried into the next window:
                # every batch has exactly batch_size rows, because each new batch shape makes oneDNN build
                # and cache new kernels (memory that grew by ~60 MB per fit before this).
                carry_x = np.zeros((0, chunks.dim), np.float32)
                carry_y = np.zeros(0, np.int64)
                for w0 in range(0, len(order), window):
                    xs, ys = [carry_x], [carry_y]
                    for c in order[w0:w0 + window]:
                        start = chunks.starts[c]
                        x = chunks.read(f, start)
                        m = train[start:start + len(x)]
                        xs.append(x[m])
                        ys.append(labels[start:start + len(x)][m])
                    xw, yw = np.concatenate(xs), np.concatenate(ys)  # (window rows, D), (window rows,)
                    perm = rng.permutation(len(xw))
                    full = len(xw) // bs * bs
                    carry_x, carry_y = xw[perm[full:]], yw[perm[full:]]  # dropped at the end of the epoch
                    x = (torch.from_numpy(xw) - model.mean) / model.scale
                    y = torch.from_numpy(yw.astype(np.int64))
                    perm = torch.from_numpy(perm[:full])
                    for i in range(0, full, bs):
                        b = perm[i:i + bs]
                        opt.zero_grad(set_to_none=True)
                        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=BF16):
                            logits = model.net(x.index_select(0, b))
                        loss_fn(logits.float(), y.index_select(0, b)).backward()
                        opt.step()
                if not val.any():
                    continue
                model.eval()
                v = _val_loss(chunks, f, model, loss_fn, labels, val)
                if v < best_loss - 1e-4:
                    best_loss, bad, best = v, 0, copy.deepcopy(model.net.state_dict())
                else:
                    bad += 1
                    if bad >= params.patience:
                        break
    if best is not None:
        model.net.load_state_dict(best)
    return model.eval()


@torch.no_grad()
def _val_loss(chunks: Chunks, f: h5py.File, model: HeadNet, loss_fn: nn.Module, labels: np.ndarray,
              val: np.ndarray) -> float:
    total, n = 0.0, 0
    for start in chunks.starts:
        m = val[start:start + chunks.rows]
        if m.any():
            x = torch.from_numpy(chunks.read(f, start))  # (r, D): whole chunk, masked after (fixed-size buffers)
            y = torch.from_numpy(labels[start:start + chunks.rows])
            mt = torch.from_numpy(m)
            total += float(nn.functional.cross_entropy(model.logits(x)[mt], y[mt], weight=loss_fn.weight,
                                                       reduction="sum"))
            n += float(loss_fn.weight[y[mt]].sum())
    return total / max(n, 1e-12)


@torch.no_grad()
def logits_streaming(chunks: Chunks, head: HeadNet, rows: np.ndarray) -> np.ndarray:
    """Uncalibrated logits (sum(rows), C) for the rows where `rows` is True, in row order."""
    out = []
    with h5py.File(chunks.path, "r") as f:
        for start in chunks.starts:
            m = rows[start:start + chunks.rows]
            if m.any():
                out.append(head.logits(torch.from_numpy(chunks.read(f, start)[m])).numpy())
    return np.concatenate(out) if out else np.zeros((0, head.net[-1].out_features), np.float32)
