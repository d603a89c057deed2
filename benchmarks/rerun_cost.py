"""What a re-run of `imgsent extract` costs, side by side in one run: the first extraction of N small images,
a re-run with nothing changed, and a re-run after adding 1% more images; each a fresh `imgsent extract`
process (the time a user waits), default backbone.

    python benchmarks/rerun_cost.py [--n 20000] [--backbone efficientnet_lite0]

The images are 64x64 PNGs of noisy colours in 3 class folders, their mtimes set an hour back (files written
a moment before a pass are hashed once more on the next run: see features/input/images.py, RACY_NS).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def make_images(root: Path, n: int, start: int = 0, seed: int = 0) -> None:
    rng = np.random.default_rng(seed + start)
    colours = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 60, 220)}
    past = time.time() - 3600
    for i in range(start, start + n):
        name = list(colours)[i % 3]
        (root / name).mkdir(parents=True, exist_ok=True)
        a = rng.integers(0, 256, (64, 64, 3)) * 0.4 + np.array(colours[name]) * 0.6
        p = root / name / f"{i:06d}.png"
        Image.fromarray(a.astype(np.uint8)).save(p)
        os.utime(p, (past, past))


def extract(images: Path, out: Path, backbone: str) -> tuple[float, str]:
    t = time.time()
    r = subprocess.run([sys.executable, "-c", "from pipeline.cli import main; main()", "extract", str(images),
                        "--out", str(out), "--backbone", backbone, "--no-progress"], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True)
    return time.time() - t, r.stdout.strip().splitlines()[-1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--backbone", default="efficientnet_lite0")
    args = ap.parse_args()
    work = ROOT / "out" / "bench" / "rerun"
    shutil.rmtree(work, ignore_errors=True)
    images, out = work / "images", work / "store.h5"
    make_images(images, args.n)
    print(f"{os.cpu_count()} CPUs; {args.n} images of 64x64; backbone {args.backbone}; fresh process each")
    first, line = extract(images, out, args.backbone)
    print(f"first run     {first:8.1f} s   {line}", flush=True)
    noop, line = extract(images, out, args.backbone)
    print(f"no-op re-run  {noop:8.1f} s   {noop / first:6.1%} of the first   {line}", flush=True)
    make_images(images, args.n // 100, start=args.n)
    more, line = extract(images, out, args.backbone)
    print(f"+1% images    {more:8.1f} s   {more / first:6.1%} of the first   {line}", flush=True)


if __name__ == "__main__":
    main()
