"""Full-batch L-BFGS for the linear head, in numpy: train-head with `hidden: []` never imports torch (1.7 s of
every run). Our own rather than scipy's: its OpenBLAS threads spin between the small vector operations, and
its line search cannot use the shortcut below."""
from __future__ import annotations

import numpy as np


def lbfgs(problem, x: np.ndarray, *, max_iter: int, callback=None, history: int = 10, gtol: float = 1e-5,
          ftol: float = 1e-9) -> np.ndarray:
    """Minimise by L-BFGS (Nocedal & Wright alg. 7.4/7.5) with Armijo backtracking. `problem` has
    start(x) -> (loss, grad), along(d) -> phi with phi(t) = loss at x + t d, and accept(t) -> (loss, grad) at the
    new point x + t d. The split lets a problem pay for a direction once and for each line-search trial little
    (the linear head: logits are linear in t). Stops when max |grad| <= gtol, when the loss changes by less than
    ftol (relative), after max_iter iterations, or when callback(x, iteration) returns True."""
    loss, g = problem.start(x)
    S: list[np.ndarray] = []
    Y: list[np.ndarray] = []
    for it in range(1, max_iter + 1):
        if float(np.abs(g).max()) <= gtol:
            break
        q, alphas = g.copy(), []
        for s, y in zip(reversed(S), reversed(Y)):  # two-loop recursion: q <- H^-1 g
            rho = 1.0 / float(y @ s)
            a = rho * float(s @ q)
            q -= a * y
            alphas.append((a, rho))
        q *= float(S[-1] @ Y[-1]) / float(Y[-1] @ Y[-1]) if S else 1.0 / max(1.0, float(np.sqrt(g @ g)))  # first: unit step
        for (s, y), (a, rho) in zip(zip(S, Y), reversed(alphas)):
            q += (a - rho * float(y @ q)) * s
        d, gtd = -q, -float(g @ q)
        if gtd >= 0:  # not a descent direction (numerical trouble): restart from steepest descent
            S.clear(), Y.clear()
            norm = max(1.0, float(np.sqrt(g @ g)))
            d, gtd = -g / norm, -float(g @ g) / norm
        phi, t = problem.along(d), 1.0
        while True:
            new_loss = phi(t)
            if new_loss <= loss + 1e-4 * t * gtd or t < 1e-8:
                break
            t *= 0.5
        new_loss, new_g = problem.accept(t)
        s, y = t * d, new_g - g
        if float(y @ s) > 1e-10:  # curvature pair kept only when it keeps H positive definite
            S.append(s), Y.append(y)
            if len(S) > history:
                S.pop(0), Y.pop(0)
        converged = abs(loss - new_loss) <= ftol * max(1.0, abs(loss))
        x, loss, g = x + s, new_loss, new_g
        if converged or (callback is not None and callback(x, it)):
            break
    return x


class Plain:
    """The `problem` of any f: x -> (loss, grad), every line-search trial a full evaluation."""

    def __init__(self, f):
        self.f = f

    def start(self, x: np.ndarray):
        self.x = x
        return self.f(x)

    def along(self, d: np.ndarray):
        self.d = d
        return lambda t: self.f(self.x + t * d)[0]

    def accept(self, t: float):
        self.x = self.x + t * self.d
        return self.f(self.x)
