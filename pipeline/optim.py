"""The head's two optimisers, our own because the first use of any torch.optim optimizer imports torch._dynamo
(1.5 s of every train-head): L-BFGS for the linear head's full-batch objective, Adam for mini-batches."""
from __future__ import annotations

import math

import torch


def lbfgs(f, x: torch.Tensor, *, max_iter: int, callback=None, history: int = 10, gtol: float = 1e-5,
          ftol: float = 1e-9) -> torch.Tensor:
    """Minimise f: x (P,) -> (loss, grad (P,)) by L-BFGS (Nocedal & Wright alg. 7.4/7.5) with Armijo
    backtracking. Our own: torch.optim.LBFGS's first use imports torch._dynamo (1.5 s), and scipy's spins
    OpenBLAS threads against torch's. callback(x, iteration) -> True stops early."""
    loss, g = f(x)
    S: list[torch.Tensor] = []
    Y: list[torch.Tensor] = []
    for it in range(1, max_iter + 1):
        if float(g.abs().max()) <= gtol:
            break
        q, alphas = g.clone(), []
        for s, y in zip(reversed(S), reversed(Y)):  # two-loop recursion: q <- H^-1 g
            rho = 1.0 / float(y.dot(s))
            a = rho * float(s.dot(q))
            q.add_(y, alpha=-a)
            alphas.append((a, rho))
        q.mul_(float(S[-1].dot(Y[-1]) / Y[-1].dot(Y[-1])) if S else 1.0 / max(1.0, float(g.abs().sum())))
        for (s, y), (a, rho) in zip(zip(S, Y), reversed(alphas)):
            q.add_(s, alpha=a - rho * float(y.dot(q)))
        d, gtd = -q, -float(g.dot(q))
        if gtd >= 0:  # not a descent direction (numerical trouble): restart from steepest descent
            S.clear(), Y.clear()
            d, gtd = -g / max(1.0, float(g.abs().sum())), -float(g.dot(g)) / max(1.0, float(g.abs().sum()))
        t = 1.0
        while True:
            new_loss, new_g = f(x + t * d)
            if new_loss <= loss + 1e-4 * t * gtd or t < 1e-8:
                break
            t *= 0.5
        s, y = t * d, new_g - g
        if float(y.dot(s)) > 1e-10:  # curvature pair kept only when it keeps H positive definite
            S.append(s), Y.append(y)
            if len(S) > history:
                S.pop(0), Y.pop(0)
        converged = abs(loss - new_loss) <= ftol * max(1.0, abs(loss))
        x, loss, g = x + s, new_loss, new_g
        if converged or (callback is not None and callback(x, it)):
            break
    return x


class Adam:
    """torch.optim.Adam's update (L2 weight decay added to the gradient, bias-corrected moments)."""

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
