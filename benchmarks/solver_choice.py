"""Why two optimisers are hand-written (pipeline/heads/lbfgs.py, the Adam in pipeline/heads/mlp.py): the library
ones measured side by side on this machine.

  1. The linear head's objective minimised by scipy's L-BFGS-B and by heads/lbfgs.py, on the demo's size
     (148 x 2560, 7 classes) and on a FER-2013-sized one (35,887 x 1280), with BLAS as it is and held to one
     thread around scipy's solver (threadpoolctl): scipy's small vector steps are BLAS calls whose threads spin.
  2. The first use of torch.optim, which imports torch._dynamo, in a fresh process.

    python benchmarks/solver_choice.py
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pipeline.heads.common import sample_weights, standardise  # noqa: E402
from pipeline.heads.lbfgs import lbfgs  # noqa: E402
from pipeline.heads.loss import linear_loss_gradient  # noqa: E402


def problem(n: int, d: int, c: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    x = (rng.normal(size=(n, d)) + 0.3 * rng.normal(size=(c, d))[y]).astype(np.float32)
    blocks, _, _ = standardise(x)
    w = sample_weights(y, c, "balanced", None)
    return (lambda coef: linear_loss_gradient(coef, blocks, y, w, 1e-4, c)), np.zeros(c * (d + 1))


def scipy_fit(fun, x0, one_thread: bool) -> tuple[float, float]:
    from scipy.optimize import minimize
    from threadpoolctl import threadpool_limits
    t = time.perf_counter()
    if one_thread:
        with threadpool_limits(1):
            r = minimize(fun, x0, jac=True, method="L-BFGS-B", options={"maxiter": 60, "gtol": 1e-5})
    else:
        r = minimize(fun, x0, jac=True, method="L-BFGS-B", options={"maxiter": 60, "gtol": 1e-5})
    return time.perf_counter() - t, float(r.fun)


def ours(fun, x0) -> tuple[float, float]:
    t = time.perf_counter()
    x, _ = lbfgs(fun, x0.astype(np.float32), max_iter=60, gtol=1e-5)
    return time.perf_counter() - t, float(fun(x)[0])


def main() -> None:
    for name, shape in (("demo, 148 x 2560, 7 classes", (148, 2560, 7)), ("FER-sized, 35,887 x 1280", (35887, 1280, 7))):
        fun, x0 = problem(*shape)
        runs = {"heads/lbfgs.py": ours(fun, x0), "scipy L-BFGS-B": scipy_fit(fun, x0, False),
                "scipy L-BFGS-B, BLAS 1 thread": scipy_fit(fun, x0, True)}
        base = runs["heads/lbfgs.py"][0]
        print(name)
        for k, (s, loss) in runs.items():
            print(f"  {k:32s} {s:7.3f} s  ({s / base:5.1f}x)  final loss {loss:.6f}")
    code = ("import time, torch; t = time.perf_counter(); torch.optim.Adam([torch.zeros(1, requires_grad=True)]).step();"
            " print(time.perf_counter() - t)")
    first = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    print(f"first torch.optim.Adam step in a fresh process (imports torch._dynamo): {first:.2f} s")


if __name__ == "__main__":
    main()
