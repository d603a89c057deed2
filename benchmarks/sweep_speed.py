"""A 12-config sweep against one train-head, side by side in one run, on the FER-hard store of head_speed.py
(35,887 x 1280, 7 classes): fresh processes, params.yaml with 5 folds, wall clock including start-up.

    python benchmarks/sweep_speed.py        sweep = lr {0.001, 0.003} x hidden {[], [256], [512]} x dropout {0.2, 0.5}
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.head_speed import make  # noqa: E402


def run(*args: str) -> float:
    t = time.time()
    subprocess.run([sys.executable, "-c", "from pipeline.cli import main; main()", *args], check=True,
                   stdout=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return time.time() - t


def main() -> None:
    work = ROOT / "out" / "bench" / "head_speed"
    work.mkdir(parents=True, exist_ok=True)
    store = make("fer-hard", 1280, work, 0)
    params = work / "mlp.yaml"
    params.write_text((ROOT / "params.yaml").read_text().replace("folds: 3 ", "folds: 5 "))
    one = run("train-head", str(store), "--out", str(work / "sweep_one"), "--params", str(params))
    sweep = run("sweep", str(store), "--out", str(work / "sweep12"), "--params", str(params), "--no-progress",
                "--grid", "head.lr=0.001,0.003", "--grid", "head.hidden=[],[256],[512]",
                "--grid", "head.dropout=0.2,0.5")
    print(f"{os.cpu_count()} CPUs; FER-hard 35,887 x 1280, 5 folds")
    print(f"one train-head        {one:6.1f} s   (the default params, 5 folds)")
    print(f"12-config sweep       {sweep:6.1f} s   = {sweep / one:.1f}x one train-head [target <= 3x]")
    print((work / "sweep12" / "sweep.csv").read_text())


if __name__ == "__main__":
    main()
