"""A streamed train-head's peak memory against the stated bound (docs/scaling.md), as tests/test_rows.py measures
it, run several times per store shape (the allocator keeps more or less after CV from run to run), optionally
beside a baseline checkout in the same run.

    python benchmarks/peak_memory.py [--runs 6] [--baseline /tmp/base]

Each run is a fresh process: warm-up fit, then the peak RSS growth (VmHWM) of train-head with cv.folds 2,
cv.memory_budget_mb 16, head.hidden [32], head.epochs 1, everything else params.yaml's, on synthetic stores of
160,000 x 256 and 20,000 x 1,280 float32 features (both streamed: over the budget).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.synthetic import synthetic_store  # noqa: E402
from tests.test_rows import PEAK, bound_mib  # noqa: E402  (the measurement and the bound the test holds it to)

SHAPES = [(160_000, 256), (20_000, 1280)]
SHELL_ENV = dict(os.environ)


def measure(tree: Path, store: Path, warm: Path, out: Path) -> float:
    """MiB the process's peak RSS grew by during one train-head, in the checkout `tree`."""
    code = PEAK + f"""
import json
from pipeline.data.rows import open_rows
from pipeline.heads.mlp import MLPHead
from pipeline.stages.train import train_head
from tests.conftest import params
warm = open_rows([{str(warm)!r}])  # imports and the first step's kernel set-up are not what is measured
MLPHead(n_classes=3, hidden=(32,), epochs=1).fit(warm.features, warm.labels)
base = reset_peak()
p = params(cv={{"folds": 2, "memory_budget_mb": 16}}, head={{"epochs": 1, "hidden": (32,)}})
m = train_head(stores=[{str(store)!r}], out={str(out)!r}, params=p, progress=lambda s: None)
assert m["mode"] == "streamed"
print(json.dumps(grew_since(base)))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tree,
                       env={**SHELL_ENV, "PYTHONPATH": str(tree)})
    if r.returncode:
        raise SystemExit(f"{tree}: {r.stderr[-1500:]}")
    return float(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=6)
    ap.add_argument("--baseline", default=None, help="a checkout to compare with, e.g. a worktree of main")
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "imgsent-bench-peak"))
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    trees = {"this checkout": ROOT} | ({"baseline": Path(args.baseline).resolve()} if args.baseline else {})
    print(f"peak RSS growth of a streamed train-head (16 MB budget), MiB over {args.runs} runs, trees alternated")
    for n, dim in SHAPES:
        store = synthetic_store(work / f"store_{n}x{dim}.h5", n=n, dim=dim)
        warm = synthetic_store(work / f"warm_{dim}.h5", n=600, dim=dim)
        seen: dict[str, list[float]] = {name: [] for name in trees}
        for _ in range(args.runs):
            for name, tree in trees.items():
                seen[name].append(measure(tree, store, warm, work / "model"))
        for name, v in seen.items():
            print(f"{n:,} x {dim:,}  {name:14s} {min(v):6.1f} - {max(v):6.1f}  (bound {bound_mib(16, n, dim):.1f})")


if __name__ == "__main__":
    main()
