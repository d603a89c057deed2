"""Cached features vs the seed approach, on data/demo, side by side in one run:

  seed:   frozen CNN inside the training loop: every epoch decodes and re-embeds every training image.
          One epoch is measured (with the same traced backbone extract uses, so this favours the seed)
          and extrapolated to the same epochs x (folds + final fit) the cached run does.
  cached: `imgsent extract` once + `imgsent train-head` (k-fold CV + final fit), measured whole.

    python benchmarks/cached_vs_end_to_end.py
"""
from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from features.models.backbones import load_backbone  # noqa: E402
from features.models.embed import iter_embeddings  # noqa: E402
from features.models.engine import forward_engine  # noqa: E402
from features.extract import extract  # noqa: E402
from features.input.sources import discover  # noqa: E402
from pipeline.stages.train import train_head  # noqa: E402
from pipeline.heads.mlp import HeadNet  # noqa: E402
from pipeline.params import load_params  # noqa: E402
from pipeline.selection.heads import AUTO_CANDIDATES  # noqa: E402


def main() -> None:
    params = load_params(str(ROOT / "params.yaml"))
    work = ROOT / "out" / "bench" / "cached"
    shutil.rmtree(work, ignore_errors=True)
    src = discover(ROOT / params.paths.train_images)
    paths = [i.abspath for i in src.items]
    labels = torch.tensor([src.class_names.index(i.label) for i in src.items])

    # seed approach: one epoch = embed every image again + one pass of head updates
    bb = load_backbone("efficientnet_lite0")
    model = forward_engine(bb, "cpu", params.extract.batch_size)
    hidden = AUTO_CANDIDATES[0] if params.head.hidden == "auto" else params.head.hidden  # auto: its hidden layer
    head = HeadNet(bb.dim, hidden, len(src.class_names), params.head.dropout)
    opt = torch.optim.Adam(head.net.parameters(), lr=params.head.lr)
    t = time.time()
    for idx, feats, _ in iter_embeddings(bb, paths, batch_size=params.extract.batch_size, workers=1,
                                         progress=False, model=model):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(head.net(torch.from_numpy(feats)), labels[idx]).backward()
        opt.step()
    epoch = time.time() - t
    fits = params.cv.folds + 1
    seed_total = epoch * params.head.epochs * fits

    t = time.time()
    extract(images=str(ROOT / params.paths.train_images), out=str(work / "train.h5"), progress=False)
    t_extract = time.time() - t
    t = time.time()
    train_head(stores=[str(work / "train.h5")], out=str(work / "model"), params=params, progress=lambda s: None)
    t_head = time.time() - t
    cached = t_extract + t_head
    print(f"data/demo: {len(paths)} training images, {params.cv.folds}-fold CV + final fit, {params.head.epochs} epochs each")
    print(f"seed (CNN in the loop): one epoch {epoch:.2f} s x {params.head.epochs} epochs x {fits} fits = {seed_total:.0f} s")
    print(f"cached: extract {t_extract:.1f} s + train-head {t_head:.1f} s = {cached:.1f} s")
    print(f"speed-up: {seed_total / cached:.0f}x;  a further head experiment costs {t_head:.1f} s instead of {seed_total:.0f} s "
          f"({seed_total / t_head:.0f}x)")


if __name__ == "__main__":
    main()
