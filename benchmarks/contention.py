"""The hidden-layer head's fit alone and beside busy processes, by how torch's threads run its mini-batch steps:
one intra-op thread (MLPHead.fit's own setting, heads/mlp.py one_thread), or every core's thread, sleeping while
they wait (OMP_WAIT_POLICY=PASSIVE, what the packages set before torch loads) or spinning (ACTIVE). Each fit runs
in a fresh process, the settings interleaved; on 1,000 rows (60 epochs: per-step overhead shows) and 20,000 (3).
Then numpy's small products (a [256] head's logits of 5 to 4,096 rows, as adapted stress batches make them) on
one BLAS thread (what heads/head.py sets below SMALL_BATCH rows) against every core's, alone and beside the same.

    python benchmarks/contention.py [--rounds 3] [--busy 2] [--rows 1000 20000]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FIT = """
import contextlib, sys, time, numpy as np, torch
sys.path.insert(0, {root!r})
import pipeline.heads.mlp as mlp
if sys.argv[1] == "all": mlp.one_thread = contextlib.nullcontext  # every core's thread inside the fit
n = int(sys.argv[2])
rng = np.random.default_rng(0)
X = rng.normal(size=(n, 1280)).astype(np.float32); y = rng.integers(0, 7, n); X[np.arange(n), y] += 2
mlp.MLPHead(n_classes=7, epochs=1).fit(X[:300], y[:300])  # oneDNN builds its kernels outside the timing
t = time.perf_counter(); mlp.MLPHead(n_classes=7, epochs=max(3, 60_000 // n), patience=10 ** 6, tol=0).fit(X, y)
print(time.perf_counter() - t)
"""
SETTINGS = {"one thread (default)": ("one", "PASSIVE"), "all threads, sleeping": ("all", "PASSIVE"),
            "all threads, spinning": ("all", "ACTIVE")}


def fit_seconds(threads: str, policy: str, rows: int) -> float:
    out = subprocess.run([sys.executable, "-c", FIT.format(root=str(ROOT)), threads, str(rows)], capture_output=True,
                         text=True, env={**os.environ, "OMP_WAIT_POLICY": policy}, check=True)
    return float(out.stdout.strip().splitlines()[-1])


PRODUCTS = """
import sys, time, numpy as np
from threadpoolctl import threadpool_limits
rng = np.random.default_rng(0)
w = rng.normal(size=(256, 1280)).astype(np.float32)
for rows in (5, 60, 300, 4096):
    x = rng.normal(size=(rows, 1280)).astype(np.float32)
    for limit in (1, None):
        with threadpool_limits(limit):
            x @ w.T
            t, k = time.perf_counter(), 0
            while time.perf_counter() - t < 0.3:
                x @ w.T
                k += 1
        print(rows, limit, (time.perf_counter() - t) / k * 1e3)
"""


def products() -> dict[tuple[int, str], float]:
    """ms per product by (rows, threads) in a fresh process."""
    out = subprocess.run([sys.executable, "-c", PRODUCTS], capture_output=True, text=True, check=True).stdout
    return {(int(r), "one" if lim == "1" else "all"): float(ms) for r, lim, ms in map(str.split, out.splitlines())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--busy", type=int, default=2)
    ap.add_argument("--rows", nargs="+", type=int, default=[1000, 20_000])
    args = ap.parse_args()
    beside = f"beside {args.busy} busy"
    times: dict[tuple, list[float]] = {}
    prods: dict[str, list[dict]] = {}
    for where in ("alone", beside):
        hogs = [] if where == "alone" else [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                                            for _ in range(args.busy)]
        try:
            time.sleep(0.5 if hogs else 0)
            for _ in range(args.rounds):
                for rows in args.rows:
                    for name, setting in SETTINGS.items():
                        times.setdefault((name, rows, where), []).append(fit_seconds(*setting, rows))
                prods.setdefault(where, []).append(products())
        finally:
            for h in hogs:
                h.kill()
    print(f"{os.cpu_count()} CPUs; MLP head fit (x 1280, 7 classes), median of {args.rounds} fresh processes")
    for rows in args.rows:
        first = np.median(times[next(iter(SETTINGS)), rows, "alone"])
        for name in SETTINGS:
            alone, busy = (np.median(times[name, rows, w]) for w in ("alone", beside))
            print(f"{rows:6d} rows  {name:22s} alone {alone:5.2f} s ({alone / first:4.2f}x the first)   {beside} "
                  f"{busy:5.2f} s ({busy / alone:4.2f}x alone)")
    print("numpy's BLAS: (rows, D) @ (D, 256), ms per product, median; one thread / every core's")
    for rows in sorted({r for r, _ in prods["alone"][0]}):
        cells = {w: [np.median([p[rows, t] for p in prods[w]]) for t in ("one", "all")] for w in prods}
        print(f"{rows:6d} rows  " + "   ".join(f"{w}: {a:7.3f} / {b:7.3f}" for w, (a, b) in cells.items()))


if __name__ == "__main__":
    main()
