"""The linear head's loss and gradient (heads/loss.linear_loss_gradient) over the rows in chunks of CHUNK, against
the same two products over all rows in one piece (its form before), side by side in one process, best of 3 rounds
of 5 evaluations each: the gradient's product reads rows the logits' product has just brought into cache.

    python benchmarks/loss_chunks.py
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pipeline.heads.loss import CHUNK, linear_loss_gradient, softmax_cross_entropy, split_coef  # noqa: E402


def one_piece(coef, blocks, y, sample_weight, l2, n_classes):
    """linear_loss_gradient as it was: each block's two products over all of its rows."""
    W, b = split_coef(coef, n_classes)
    loss, gW, gb, start = 0.0, np.zeros(W.shape, np.float64), np.zeros(n_classes, np.float64), 0
    for x in blocks:
        end = start + len(x)
        ce, g = softmax_cross_entropy(x @ W.T + b, y[start:end], sample_weight[start:end])
        loss, gW, gb, start = loss + ce, gW + g.T @ x, gb + g.sum(0), end
    total, Wd = float(sample_weight.sum(dtype=np.float64)), W.astype(np.float64)
    return loss / total + 0.5 * l2 * float(np.dot(Wd.ravel(), Wd.ravel())), \
        np.concatenate([(gW / total + l2 * Wd).ravel(), gb / total])


def main() -> None:
    rng = np.random.default_rng(0)
    for n, c in ((28_700, 7), (8_000, 100), (800, 3)):
        x = rng.standard_normal((n, 1280)).astype(np.float32)
        y, w, coef = rng.integers(0, c, n), np.ones(n, np.float32), rng.standard_normal(c * 1281) * 0.01
        best = {}
        for _ in range(3):
            for name, f in (("one piece", one_piece), ("chunks", linear_loss_gradient)):
                f(coef, [x], y, w, 1e-4, c)
                t = time.perf_counter()
                for _ in range(5):
                    f(coef, [x], y, w, 1e-4, c)
                best[name] = min(best.get(name, np.inf), (time.perf_counter() - t) / 5 * 1e3)
        a, b = best["one piece"], best["chunks"]
        print(f"{n:6d} x 1280, {c:3d} classes: one piece {a:6.1f} ms, chunks of {CHUNK} {b:6.1f} ms an evaluation "
              f"({a / b:.2f}x)")


if __name__ == "__main__":
    main()
