"""What feeding the forward costs the main thread: `iter_embeddings` with a forward that costs nothing, so the
main thread's CPU time is its own work (collecting decoded images into batches, stacking, copying), measured
with time.thread_time, side by side for this checkout and another (--baseline TREE, e.g. a worktree of main).

On a GPU box that main thread is the one that must launch the forward while every core decodes; whatever it
spends per image caps the whole extraction (issue #22). Two image sets: photos (1/2 800x600, 1/4 1600x1200,
1/4 4000x3000, as extract_throughput.py) and small 320x256 JPEGs, where decoding is cheap and the feed shows.

    python benchmarks/feed_cost.py [--photos 40] [--baseline /tmp/main-before]
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
SHELL_ENV = dict(os.environ)  # what each measured process starts with: not the defaults features/__init__.py sets
# here once main() imports it (a baseline tree sets its own, or none)

# Runs inside each tree (its own imports), prints one JSON line per (images, batch size).
PROBE = r"""
import json, sys, time
import torch
from features.models.backbones import load_backbone
from features.models.embed import iter_embeddings
sets, threads = json.loads(sys.argv[1]), int(sys.argv[2])
bb = load_backbone("efficientnet_lite0")
free = lambda x: torch.zeros(len(x), bb.dim)  # the forward costs nothing: what remains is the feed
for name, paths in sets.items():
    for batch in (32, 256):
        best = None
        for _ in range(3):
            wall, cpu = time.perf_counter(), time.thread_time()
            for _ in iter_embeddings(bb, paths, batch_size=batch, workers=threads, progress=False, model=free):
                pass
            r = ((time.thread_time() - cpu) / len(paths) * 1e6, len(paths) / (time.perf_counter() - wall))
            best = r if best is None or r[1] > best[1] else best
        print(json.dumps({"images": name, "batch": batch, "main_us": best[0], "rate": best[1]}), flush=True)
"""


def small_jpegs(folder: Path, n: int = 64) -> list[str]:
    import numpy as np
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"s{i:03d}.jpg"
        if not path.exists():
            rng = np.random.default_rng(i)
            Image.fromarray(rng.normal(128, 40, (256, 320, 3)).clip(0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(str(path))
    return paths


def main() -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from extract_throughput import make_photos
    from features.input.prefetch import available_cores
    ap = argparse.ArgumentParser()
    ap.add_argument("--photos", type=int, default=40)
    ap.add_argument("--baseline", default=None, help="a checkout to compare with, e.g. a worktree of main")
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "imgsent-bench-feed"))
    args = ap.parse_args()
    work, threads = Path(args.work), available_cores()
    sets = {"photos": make_photos(work / "photos", args.photos) * 3, "320x256": small_jpegs(work / "small") * 8}
    trees = {"this checkout": ROOT} | ({"baseline": Path(args.baseline).resolve()} if args.baseline else {})
    print(f"{threads} decode threads; a free forward; main-thread CPU per image and img/s (best of 3)")
    for name, tree in trees.items():
        r = subprocess.run([sys.executable, "-c", PROBE, json.dumps(sets), str(threads)], capture_output=True,
                           text=True, cwd=tree, env={**SHELL_ENV, "PYTHONPATH": str(tree)})
        if r.returncode:
            raise SystemExit(f"{name} failed:\n{r.stderr[-1500:]}")
        for line in r.stdout.splitlines():
            d = json.loads(line)
            print(f"{name:>14}  {d['images']:>8}  batch {d['batch']:>3}: main thread {d['main_us']:7.0f} us/img, "
                  f"{d['rate']:7.0f} img/s")


if __name__ == "__main__":
    main()
