"""The linear head's objective, stateless (as scikit-learn's LinearModelLoss): class-weighted softmax cross-entropy
on logits, and the loss and gradient in its parameters, which heads/linear.py's L-BFGS calls. The hidden-layer head
(heads/mlp.py) trains on torch's cross-entropy, the same weighted loss, through autograd."""
from __future__ import annotations

import numpy as np

from pipeline.heads.common import Blocks

CHUNK = 4096  # rows per pair of products: the gradient's product then reads the rows the logits' product just
# read from cache, not memory (28,700 x 1280 x 7 classes: 46 -> 35 ms an evaluation; benchmarks/loss_chunks.py)


def softmax_cross_entropy(z: np.ndarray, y: np.ndarray, sample_weight: np.ndarray) -> tuple[float, np.ndarray]:
    """sum_i w_i * -log softmax(z_i)[y_i] and its gradient in the logits: z (n, C), y (n,), w (n,) -> (float, (n, C))."""
    z = z - z.max(1, keepdims=True)  # (n, C) <= 0: exp never overflows
    e = np.exp(z)
    s = e.sum(1, keepdims=True)  # (n, 1)
    rows = np.arange(len(y))
    loss = -float(np.dot(sample_weight.astype(np.float64), z[rows, y] - np.log(s[:, 0])))
    p = e / s  # softmax
    p[rows, y] -= 1
    return loss, p * sample_weight[:, None]


def split_coef(coef: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """The flat parameter vector [W (C*D), b (C)] -> W (C, D), b (C,) as float32."""
    d = (len(coef) - n_classes) // n_classes
    return coef[:n_classes * d].reshape(n_classes, d).astype(np.float32), coef[n_classes * d:].astype(np.float32)


def linear_loss_gradient(coef: np.ndarray, blocks: Blocks, y: np.ndarray, sample_weight: np.ndarray,
                         l2: float, n_classes: int) -> tuple[float, np.ndarray]:
    """Multinomial logistic regression on standardised features: coef = [W (C*D), b (C)] (flat, float64 from
    the solver) -> (sum_i w_i CE_i / sum_i w_i + l2/2 |W|^2 (bias not penalised), gradient like coef).
    Two passes over the rows: logits X W^T + b, then the gradient G^T X."""
    W, b = split_coef(coef, n_classes)  # (C, D), (C,)
    d = W.shape[1]
    loss, gW, gb, start = 0.0, np.zeros((n_classes, d), np.float64), np.zeros(n_classes, np.float64), 0
    for block in blocks:  # (r, D) each
        for i in range(0, len(block), CHUNK):  # both products on rows still in the CPU's cache
            x = block[i:i + CHUNK]  # (c, D)
            end = start + len(x)
            ce, g = softmax_cross_entropy(x @ W.T + b, y[start:end], sample_weight[start:end])  # g: (c, C)
            loss, gW, gb, start = loss + ce, gW + g.T @ x, gb + g.sum(0), end
    total = float(sample_weight.sum(dtype=np.float64))
    Wd = W.astype(np.float64)
    loss = loss / total + 0.5 * l2 * float(np.dot(Wd.ravel(), Wd.ravel()))
    return loss, np.concatenate([(gW / total + l2 * Wd).ravel(), gb / total])
