"""The [256] head's cost per epoch against a plain torch loop on the same tensors, side by side in one process.

    ours   MLPHead.fit (pipeline/heads/mlp.py) for a fixed number of epochs, no validation slice, patience and
           tol set so it never stops early: standardisation, shuffling, class weights, Dropout, Adam, the checks
    plain  nn.Sequential(Linear, ReLU, Dropout, Linear), torch.optim.Adam(fused=True), CrossEntropyLoss(weight),
           the same batch size, the same standardised rows, in fp32 (and with bf16 autocast where the CPU has it)

On 1,000 rows (8 steps an epoch: per-step overhead shows) and 35,887 rows (281 steps an epoch).

    python benchmarks/mlp_step.py [--epochs 3] [--rows 1000 35887]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pipeline.heads.common import class_weights, standardise  # noqa: E402
from pipeline.heads.mlp import BF16, MLPHead  # noqa: E402


def data(n: int, d: int = 1280, c: int = 7, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    return np.maximum(rng.normal(size=(n, d)) + 0.3 * rng.normal(size=(c, d))[y], 0).astype(np.float32), y


def ours(x: np.ndarray, y: np.ndarray, epochs: int) -> float:
    t = time.perf_counter()
    MLPHead(n_classes=int(y.max()) + 1, epochs=epochs, patience=10 ** 6, tol=0.0).fit(x, y)
    return time.perf_counter() - t


def plain(x: np.ndarray, y: np.ndarray, epochs: int, bf16: bool, bs: int = 128) -> float:
    c = int(y.max()) + 1
    t = time.perf_counter()
    xs = torch.from_numpy(standardise(x)[0][0])
    ys = torch.from_numpy(y)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(x.shape[1], 256), nn.ReLU(), nn.Dropout(0.3), nn.Linear(256, c))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, weight_decay=1e-4, fused=True)
    loss_fn = nn.CrossEntropyLoss(weight=torch.from_numpy(class_weights(y, c, "balanced")))
    for _ in range(epochs):
        perm = torch.randperm(len(ys))
        for i in range(0, len(ys), bs):
            b = perm[i:i + bs]
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                out = net(xs.index_select(0, b))
            loss_fn(out.float(), ys.index_select(0, b)).backward()
            opt.step()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--rows", nargs="+", type=int, default=[1000, 35_887])
    args = ap.parse_args()
    torch.optim.Adam([nn.Parameter(torch.zeros(1))])  # torch.optim's one-off import outside the timings
    plain(*data(256), 1, False)  # warm-up: oneDNN builds its kernels on first use
    print(f"{torch.get_num_threads()} threads; bf16 autocast in MLPHead: {BF16}; seconds per epoch, best of 3")
    print(f"{'rows':>7s} {'ours':>8s} {'plain fp32':>10s} {'plain bf16':>10s} {'ours/plain fp32':>15s}")
    for n in args.rows:
        x, y = data(n)
        a = min(ours(x, y, args.epochs) for _ in range(3)) / args.epochs
        b = min(plain(x, y, args.epochs, False) for _ in range(3)) / args.epochs
        c = min(plain(x, y, args.epochs, True) for _ in range(3)) / args.epochs if BF16 else float("nan")
        print(f"{n:7d} {a:8.3f} {b:10.3f} {c:10.3f} {a / b:14.2f}x", flush=True)


if __name__ == "__main__":
    main()
