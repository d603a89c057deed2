"""Scaling out, measured on this machine:

  1. extraction throughput: one process vs `torchrun --standalone --nproc-per-node=2` on the same images
  2. streaming head training (stores over cv.memory_budget_mb): rows/s and peak RSS against store size

    python benchmarks/scale_out.py   (needs benchmarks/extract_throughput.py's images: run it first)
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def extraction(images: Path, work: Path) -> None:
    runs = {
        "1 process (2 threads, 1 decode worker)": [str(BIN / "imgsent"), "extract", str(images), "--out",
                                                   str(work / "one.h5"), "--no-progress"],
        "torchrun 2 processes (1 thread each)": [str(BIN / "torchrun"), "--standalone", "--nproc-per-node=2",
                                                 "--no-python", str(BIN / "imgsent"), "extract", str(images),
                                                 "--out", str(work / "two.h5"), "--workers", "0", "--no-progress"],
    }
    n = sum(1 for p in images.rglob("*") if p.is_file())
    res = {}
    for name, cmd in runs.items():
        for p in work.glob("*.h5"):
            p.unlink()
        env = {**os.environ, "OMP_NUM_THREADS": "1"} if "torchrun" in name else dict(os.environ)
        t = time.time()
        subprocess.run(cmd, check=True, capture_output=True, env=env)
        res[name] = n / (time.time() - t)
    base = next(iter(res.values()))
    for name, r in res.items():
        print(f"  {name:42s} {r:6.1f} img/s  ({r / base:.2f}x)")


def streaming(work: Path) -> None:
    sys.path.insert(0, str(ROOT))
    from tests.synthetic import synthetic_store
    for n in (100_000, 200_000, 400_000):
        store = work / f"s{n}.h5"
        if not store.exists():
            synthetic_store(store, n=n, dim=256)
        code = f"""
import dataclasses, json, resource, sys, time
sys.path.insert(0, {str(ROOT)!r})
from pipeline.stages.train import train_head
from pipeline.params import load_params
p = load_params({str(ROOT / "params.yaml")!r})
p = dataclasses.replace(p, cv=dataclasses.replace(p.cv, folds=2, memory_budget_mb=32, repeats=1),
                        head=dataclasses.replace(p.head, epochs=2, hidden=(256,), adapt="none", align="none"))
t = time.time()
m = train_head(stores=[{str(store)!r}], out={str(work / 'm')!r}, params=p, progress=lambda s: None)
print(json.dumps({{"s": time.time() - t, "mode": m["mode"], "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""
        r = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                      check=True).stdout.strip().splitlines()[-1])
        rows = n * 2 * 3  # 2 epochs x (2 folds + final fit), each over about all rows
        print(f"  {n:>7d} x 256 ({n * 256 * 4 >> 20:4d} MiB of features): {r['mode']}, {r['s']:5.1f} s, "
              f"{rows / r['s']:8.0f} rows/s, peak RSS {r['rss']:.0f} MiB")


def main() -> None:
    work = ROOT / "out" / "bench" / "scale"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    images = ROOT / "out" / "bench" / "throughput" / "images"
    if not any(p.is_file() for p in images.rglob("*")):
        sys.exit(f"{images}: no images; run benchmarks/extract_throughput.py first, which makes them")
    print(f"extraction, {sum(1 for p in images.rglob('*') if p.is_file())} images, {os.cpu_count()} CPUs:")
    extraction(images, work)
    print("streaming head training (budget 32 MiB, 2 folds + final fit, 2 epochs, hidden [256], no adaptation, "
          "one CV run: every pass a training pass):")
    streaming(work)


if __name__ == "__main__":
    main()
