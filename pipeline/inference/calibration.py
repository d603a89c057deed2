"""Calibration: temperature scaling of logits (softmax(logits, T), heads/head.py, applies it)."""
from __future__ import annotations

import numpy as np


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """Temperature scaling (Guo et al. 2017): the T > 0 minimising NLL of softmax(logits / T). The NLL is convex
    in s = 1/T (a log-sum-exp of lines in s), so safeguarded Newton steps on s in [0.01, 100] find it in a few
    iterations; numpy only (scipy.optimize's import alone costs 0.4 s)."""
    z = logits.astype(np.float64)  # (N, C)
    if not len(z) or (z.argmax(1) == labels).all():
        return 1.0  # every out-of-fold prediction right: the NLL falls forever as T -> 0, no evidence to calibrate
    z -= z.max(1, keepdims=True)  # <= 0: exp(s z) never overflows for s > 0, and NLL, slope, curvature are unchanged
    zy = z[np.arange(len(labels)), labels]  # (N,)
    z2 = z * z

    def nll_grad_hess(s: float) -> tuple[float, float, float]:
        e = np.exp(s * z)  # (N, C) unnormalised softmax(s z); each row's largest is exp(0) = 1
        tot = e.sum(1)  # (N,) >= 1
        ez, ez2 = np.einsum("ij,ij->i", e, z) / tot, np.einsum("ij,ij->i", e, z2) / tot  # E_p[z], E_p[z^2]
        nll = float(np.mean(np.log(tot) - s * zy))
        return nll, float(np.mean(ez - zy)), float(np.mean(ez2 - ez ** 2))

    s, lo, hi = 1.0, 0.01, 100.0
    f, g, h = nll_grad_hess(s)
    for _ in range(100):
        step = g / h if h > 1e-12 else np.sign(g) * s * 0.5
        new = float(np.clip(s - step, lo, hi))
        while True:  # halve the step until the NLL does not increase
            nf, ng, nh = nll_grad_hess(new)
            if nf <= f + 1e-12 or abs(new - s) < 1e-9 * s:
                break
            new = (new + s) / 2
        done = abs(new - s) <= 1e-7 * s
        s, f, g, h = new, nf, ng, nh
        if done:
            break
    t = 1.0 / s
    return t if np.isfinite(t) and 0.0101 < t < 99 else 1.0
