"""Extraction throughput, side by side in one run on the same images:

  (a) ceiling: the backbone's forward pass alone on ready uint8 tensors, per engine: onnxruntime (extract's
      default on CPU) and torch channels_last + jit.freeze; and their features' min cosine
  (b) `imgsent extract` end to end (hash, decode, resize, forward, HDF5 write), fresh store, per engine
  (c) naive reference: PIL + torchvision transforms, eager fp32 NCHW, no DataLoader workers, list of features

Images: the emoji of ../shared/data (128 px PNG) plus generated 640x480 photo-like JPEGs.

    python benchmarks/extract_throughput.py [--photos 300] [--emoji 600] [--workers 1]
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
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from features.backbones import load_backbone  # noqa: E402
from features.engine import onnx_embedder, torch_model  # noqa: E402


def photos(folder: Path, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:480, 0:640]
    for i in range(n):
        if (folder / f"p{i:05d}.jpg").exists():
            continue
        c = rng.uniform(0, 255, 3)
        a = (c + 60 * np.sin(xx[..., None] / rng.uniform(20, 90) + yy[..., None] / rng.uniform(20, 90) + rng.uniform(0, 6, 3))
             + rng.normal(0, 12, (480, 640, 3)))
        Image.fromarray(a.clip(0, 255).astype(np.uint8)).save(folder / f"p{i:05d}.jpg", quality=90)


def naive(paths: list[str]) -> float:
    import torchvision.transforms as T
    bb = load_backbone("efficientnet_lite0")
    net = bb.embedder.net.eval()
    tf = T.Compose([T.Resize(256, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224), T.ToTensor(),
                    T.Normalize((0.5,) * 3, (0.5,) * 3)])
    feats = []
    t = time.time()
    with torch.inference_mode():
        for i in range(0, len(paths), 32):
            x = torch.stack([tf(Image.open(p).convert("RGB")) for p in paths[i:i + 32]])
            feats.extend(net(x).numpy())
    return len(paths) / (time.time() - t)


def ceilings(n: int, batch: int = 32) -> tuple[dict[str, float], float]:
    """img/s of the forward pass per engine, in alternating blocks of n/4 images (ABABABAB, so machine drift hits
    both alike and neither engine's idle threads overlap the other's run), and the min cosine between their
    features."""
    bb = load_backbone("efficientnet_lite0")
    models = {"onnxruntime": onnx_embedder(bb), "torch": torch_model(bb, "cpu", batch)}
    if models["onnxruntime"] is None:
        del models["onnxruntime"]
    x = torch.randint(0, 256, (batch, 3, 224, 224), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    secs = dict.fromkeys(models, 0.0)
    per_block = max(1, n // 4 // batch)
    with torch.inference_mode():
        outs = {k: m(x) for k, m in models.items()}
        for _ in range(4):
            for k, m in models.items():
                t = time.time()
                for _ in range(per_block):
                    m(x)
                secs[k] += time.time() - t
    done = 4 * per_block * batch
    cos = float(torch.nn.functional.cosine_similarity(*outs.values(), dim=1).min()) if len(outs) == 2 else 1.0
    return {k: done / s for k, s in secs.items()}, cos


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--photos", type=int, default=1000)
    ap.add_argument("--emoji", type=int, default=1500)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()
    work = ROOT / "out" / "bench" / "throughput"
    imgs = work / "images"
    photos(imgs / "photo", args.photos)
    emoji = sorted((ROOT.parent / "shared" / "data").glob("*/*/*/*.png"))[: args.emoji]
    (imgs / "emoji").mkdir(parents=True, exist_ok=True)
    for i, p in enumerate(emoji):
        dst = imgs / "emoji" / f"e{i:05d}.png"
        if not dst.exists():
            shutil.copy(p, dst)
    paths = sorted(str(p) for p in imgs.rglob("*.*"))
    n = len(paths)
    print(f"{n} images ({args.photos} 640x480 JPEG, {len(emoji)} 128px PNG), torch threads {torch.get_num_threads()}, "
          f"{os.cpu_count()} CPUs, ISA {torch.backends.cpu.get_cpu_capability()}")

    ceiling, cos = ceilings(n)
    ours = {}
    for engine in ceiling:
        for w in args.workers:
            store = work / f"store-{engine}-w{w}.h5"
            store.unlink(missing_ok=True)
            # a child process per run, so peak RSS (ru_maxrss) is this extraction's own
            code = (f"import time,resource,sys; sys.path.insert(0,{str(ROOT)!r}); from features.extract import extract; "
                    f"t=time.time(); s=extract(images={str(imgs)!r}, out={str(store)!r}, workers={w}, progress=False, "
                    f"engine={'onnx' if engine == 'onnxruntime' else 'torch'!r}); "
                    f"print(s.extracted/(time.time()-t), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
            ours[engine, w] = (float(out[-2]), int(out[-1]) / 1024)
    r_naive = naive(paths)
    best = max(ceiling.values())
    for engine, r in ceiling.items():
        print(f"(a) ceiling, forward only, {engine:12s}: {r:6.1f} img/s ({r / ceiling['torch']:.2f}x torch)")
    print(f"    features onnxruntime vs torch: min cosine {cos:.6f}")
    for (engine, w), (r, rss) in ours.items():
        print(f"(b) imgsent extract, {engine:12s} workers={w}: {r:6.1f} img/s = {r / best:.0%} of the best (a) "
              f"[target >= 85%], {r / r_naive:.2f}x (c) [target >= 2.5x], peak RSS {rss:.0f} MiB")
    print(f"(c) naive PIL + eager fp32 NCHW loop: {r_naive:6.1f} img/s")


if __name__ == "__main__":
    main()
