"""`imgsent extract` with default flags against this machine's own ceiling, and against another checkout (e.g.
main before issue #22), side by side in one run on the same photos:

  (a) decode + resize alone: the product's loader (features/input/images.py + resize) on every available core
  (b) forward alone: the default CPU engine on a ready uint8 batch (32 images)
  (c) ceiling = 1 / (1/a + 1/b): decode and forward share the cores, so their times per image add up
  (d) `imgsent extract` with default flags: img/s of its embedding phase (its summary line) and of the whole
      process (imports, hashing and writing the store included)
  (e) the same for --baseline TREE (a git worktree of an older commit)
Each round measures (a), (b), (d) and (e) in turn; the ratio to the ceiling is per round, then the median.

Photos: photo-like JPEGs (real sample photos, random crops, sensor noise) in three sizes: half 800x600, a
quarter 1600x1200, a quarter 4000x3000 (12 MP camera originals).

    git worktree add /tmp/main-before 3b65338
    python benchmarks/extract_throughput.py [--photos 80] [--repeat 3] [--baseline /tmp/main-before]
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from features.models.backbones import load_backbone  # noqa: E402
from features.models.preprocess import prepare
from features.models.engine import forward_engine  # noqa: E402
from features.input.images import decode_tensor  # noqa: E402
from features.input.prefetch import available_cores, ordered_map  # noqa: E402

SIZES = [(800, 600), (800, 600), (1600, 1200), (4000, 3000)]  # cycled: 1/2, 1/4, 1/4


def make_photos(folder: Path, n: int) -> list[str]:
    from skimage import data
    srcs = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    paths = []
    for i in range(n):
        path = folder / f"c{i % 2}" / f"p{i:04d}.jpg"
        paths.append(str(path))
        if path.exists():
            continue
        rng = np.random.default_rng(i)
        w, h = SIZES[i % len(SIZES)]
        src = srcs[i % len(srcs)]
        y, x = rng.integers(0, src.shape[0] // 4), rng.integers(0, src.shape[1] // 4)  # a random crop
        a = np.asarray(Image.fromarray(src[y:, x:]).resize((w, h), Image.BICUBIC), np.float32)
        a += rng.normal(0, 6, a.shape)  # sensor noise: photo-like entropy
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(a.clip(0, 255).astype(np.uint8)).save(path, quality=90)
    return paths


def decode_rate(paths: list[str]) -> float:
    pre = load_backbone("efficientnet_lite0").pre
    cores = available_cores()
    t = time.perf_counter()
    for _ in ordered_map(lambda p: prepare(decode_tensor(p), pre), paths, workers=cores, window=4 * cores,
                         initializer=lambda: torch.set_num_threads(1)):
        pass
    return len(paths) / (time.perf_counter() - t)


def forward_rate(batch: int = 32, repeat: int = 6) -> float:
    model = forward_engine(load_backbone("efficientnet_lite0"), "cpu", batch)
    x = torch.randint(0, 256, (batch, 3, 224, 224), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        model(x)
        t = time.perf_counter()
        for _ in range(repeat):
            model(x)
    return repeat * batch / (time.perf_counter() - t)


def run_extract(tree: Path, images: Path, store: Path) -> tuple[float, float]:
    """(embedding img/s from the summary line, whole-process img/s) of a fresh `imgsent extract`."""
    store.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": str(tree)}
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", "from pipeline.cli import main; main()", "extract", str(images),
                        "--out", str(store), "--no-progress"], capture_output=True, text=True, env=env, cwd=tree)
    wall = time.perf_counter() - t
    if r.returncode:
        raise SystemExit(f"extract in {tree} failed:\n{r.stderr[-1500:]}")
    n = int(re.search(r"(\d+) extracted", r.stdout).group(1))
    return float(re.search(r"([\d.]+) img/s embedding", r.stdout).group(1)), n / wall


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--photos", type=int, default=80)
    ap.add_argument("--repeat", type=int, default=3, help="rounds: ceiling, then each extract")
    ap.add_argument("--baseline", default=None, help="a checkout to compare with, e.g. a worktree of main")
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "imgsent-bench-throughput"))
    args = ap.parse_args()
    work = Path(args.work)
    paths = make_photos(work / "photos", args.photos)
    print(f"{len(paths)} photos (1/2 800x600, 1/4 1600x1200, 1/4 4000x3000), {available_cores()} cores, "
          f"torch {torch.__version__}", flush=True)
    trees = {"this checkout": ROOT} | ({"baseline": Path(args.baseline).resolve()} if args.baseline else {})
    warm = work / "warm"
    make_photos(warm, 2)
    for name, tree in trees.items():  # ONNX export and first-run caches out of the timings
        run_extract(tree, warm, work / f"warm-{name.replace(' ', '_')}.h5")
    # The machine's speed drifts within minutes here, so the ceiling is measured in every round, beside the
    # extract runs it is compared with: round i's ratio is d_i / c_i.
    runs: dict[str, list[tuple[float, float]]] = {k: [] for k in trees}
    ceilings = []
    for i in range(args.repeat):
        a, b = decode_rate(paths), forward_rate()
        ceilings.append(1 / (1 / a + 1 / b))
        print(f"round {i + 1}: (a) decode + resize alone, {available_cores()} threads {a:6.1f} img/s; (b) forward "
              f"alone, CPU engine {b:6.1f}; (c) ceiling 1/(1/a + 1/b) {ceilings[-1]:6.1f}", flush=True)
        for name, tree in trees.items():
            runs[name].append(run_extract(tree, work / "photos", work / f"s-{name.replace(' ', '_')}.h5"))
            emb = runs[name][-1][0]
            print(f"         (d) imgsent extract, default flags, {name}: {emb:6.1f} img/s embedding = "
                  f"{emb / ceilings[-1]:.0%} of (c); {runs[name][-1][1]:6.1f} img/s whole process", flush=True)
    for name, v in runs.items():
        ratios = sorted(e / c for (e, _), c in zip(v, ceilings))
        vs = ""
        if "baseline" in runs and name != "baseline":
            vs = f"; {sorted(e / eb for (e, _), (eb, _) in zip(v, runs['baseline']))[len(v) // 2]:.2f}x the baseline"
        print(f"{name}: median of rounds {ratios[len(ratios) // 2]:.0%} of (c) (rounds "
              f"{', '.join(f'{r:.0%}' for r in ratios)}){vs}")

if __name__ == "__main__":
    main()
