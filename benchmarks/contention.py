"""The hidden-layer head's fit beside other busy processes (issue #32: a train-head that took 2.5 s alone took 3.4x
as long beside two busy processes, where a fair share of 2 cores among 3 is ~1.5-2x): torch's intra-op threads as
they are (2 here, spinning while they wait), one thread, and two that sleep while they wait (OMP_WAIT_POLICY=PASSIVE).
Each fit runs in a fresh process, the settings interleaved, alone and beside `--busy` pure-Python loops.

    python benchmarks/contention.py [--rounds 3] [--busy 2]
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
import sys, time, numpy as np, torch
sys.path.insert(0, {root!r})
threads = int(sys.argv[1])
if threads: torch.set_num_threads(threads)
from pipeline.heads.mlp import MLPHead
rng = np.random.default_rng(0)
X = rng.normal(size=(20000, 1280)).astype(np.float32); y = rng.integers(0, 7, 20000); X[np.arange(20000), y] += 2
t = time.perf_counter(); MLPHead(n_classes=7, hidden=(256,), epochs=3, patience=100).fit(X, y)
print(time.perf_counter() - t)
"""
SETTINGS = {"as is (spinning)": ("0", {}), "1 thread": ("1", {}), "passive wait": ("0", {"OMP_WAIT_POLICY": "PASSIVE"})}


def fit_seconds(threads: str, env: dict) -> float:
    out = subprocess.run([sys.executable, "-c", FIT.format(root=str(ROOT)), threads], capture_output=True, text=True,
                         env={**os.environ, **env}, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--busy", type=int, default=2)
    args = ap.parse_args()
    times: dict[tuple[str, str], list[float]] = {}
    for where in ("alone", f"beside {args.busy} busy"):
        hogs = [] if where == "alone" else [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                                            for _ in range(args.busy)]
        try:
            time.sleep(0.5 if hogs else 0)
            for _ in range(args.rounds):
                for name, (threads, env) in SETTINGS.items():
                    times.setdefault((name, where), []).append(fit_seconds(threads, env))
        finally:
            for h in hogs:
                h.kill()
    print(f"MLP head fit (20,000 x 1280, 3 epochs), median of {args.rounds} fresh processes; ratio to the same setting alone")
    for name in SETTINGS:
        alone, busy = (np.median(times[name, w]) for w in ("alone", f"beside {args.busy} busy"))
        print(f"{name:18s} alone {alone:5.2f} s   beside {args.busy} busy {busy:5.2f} s   {busy / alone:4.2f}x   "
              f"(runs: {', '.join(f'{t:.2f}' for t in times[name, f'beside {args.busy} busy'])})")


if __name__ == "__main__":
    main()
