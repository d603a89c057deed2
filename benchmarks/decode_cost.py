"""What full JPEG decoding (needed for exported models to agree with predict) costs against libjpeg's DCT-scaled
draft decoding (what extract used before), per photo-sized image, decode + resize to the network input, one run:

    python benchmarks/decode_cost.py [--n 60]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_sample_image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from features.models.preprocess import Preprocess, prepare  # noqa: E402
from features.input.images import decode  # noqa: E402


def draft_decode(path: str, size: int) -> np.ndarray:
    with Image.open(path) as im:
        im.draft("RGB", (size, size))
        return np.array(im.convert("RGB"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=60)
    args = ap.parse_args()
    pre = Preprocess(size=224, resize=256, interpolation="bicubic", mean=(0.5,) * 3, std=(0.5,) * 3)
    with tempfile.TemporaryDirectory() as d:
        paths = []
        for i, (name, size) in enumerate([("china.jpg", (1200, 900)), ("flower.jpg", (4000, 3000))]):
            p = f"{d}/{i}.jpg"
            Image.fromarray(load_sample_image(name)).resize(size).save(p, quality=90)
            paths.append((p, size))
        for p, size in paths:
            res = {}
            for name, fn in (("full decode (now)", lambda: prepare(decode(p), pre)),
                             ("draft decode (before)", lambda: prepare(draft_decode(p, pre.resize), pre))):
                fn()
                t = time.perf_counter()
                for _ in range(args.n):
                    fn()
                res[name] = (time.perf_counter() - t) / args.n * 1000
            full, draft = res["full decode (now)"], res["draft decode (before)"]
            print(f"{size[0]}x{size[1]} JPEG: full {full:6.1f} ms/img, draft {draft:6.1f} ms/img, "
                  f"full/draft {full / draft:.2f}x")


if __name__ == "__main__":
    main()
