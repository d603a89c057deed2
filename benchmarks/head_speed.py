"""Head training speed on a FER-2013-sized store (35,887 x 1280, 7 classes, Gaussian-mixture features
written with the store schema), side by side in one run:

  (a) `imgsent train-head` with default params and 5-fold CV, wall time including reading the store
  (b) scikit-learn LogisticRegression(max_iter=1000), 5-fold on the same features (same folds)
  (c) a sweep of 12 head configurations (lr x hidden x dropout) through the Python API

    python benchmarks/head_speed.py
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import yaml
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from sklearn.preprocessing import StandardScaler

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pipeline.cv import cross_validate, make_folds  # noqa: E402
from pipeline.dataset import load_dataset  # noqa: E402
from pipeline.params import load_params  # noqa: E402

N, D, C = 35_887, 1280, 7


def make_store(path: Path, seed: int = 0) -> None:
    """Class means on a random 32-dim subspace + isotropic noise: overlapping classes, real structure."""
    rng = np.random.default_rng(seed)
    prior = np.array([4953, 547, 5121, 8989, 6077, 4002, 6198], float)  # FER-2013 class counts
    y = rng.choice(C, size=N, p=prior / prior.sum())
    basis = rng.normal(size=(32, D)) / np.sqrt(32)
    means = rng.normal(size=(C, 32)) * 0.35  # ~65% accuracy: about as hard as FER-2013 itself
    x = (means[y] + rng.normal(size=(N, 32))) @ basis + rng.normal(size=(N, D)) * 0.5
    x = np.maximum(x + 0.3, 0).astype(np.float32)  # post-ReLU-like, non-negative
    fp = {"backbone": "synthetic", "weights_sha256": "0" * 64, "preprocess": {}, "dim": D}
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=x, chunks=(256, D))
        f.create_dataset("labels", data=y.astype(np.int64))
        f.create_dataset("paths", data=[f"img/{i:06d}.png" for i in range(N)], dtype=h5py.string_dtype())
        f.create_dataset("sha256", data=np.array([f"{i:064x}" for i in range(N)], dtype="S64"))
        f.attrs.update({"class_names": json.dumps(["angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"]),
                        "fingerprint": json.dumps(fp), "backbone": "synthetic", "weights_sha256": "0" * 64,
                        "preprocess": "{}", "dim": D, "root": "", "complete": 1})


def main() -> None:
    import argparse
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-sweep", action="store_true")
    args = ap.parse_args()
    work = ROOT / "out" / "bench"
    work.mkdir(parents=True, exist_ok=True)
    store = work / "fer_sized.h5"
    if not store.exists():
        make_store(store)
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["cv"]["folds"] = 5
    pfile = work / "params_5fold.yaml"
    pfile.write_text(yaml.safe_dump(raw))
    params = load_params(str(pfile))

    t = time.time()
    subprocess.run([sys.executable, "-c", "from pipeline.cli import main; main()", "train-head", str(store),
                    "--out", str(work / "fer_model"), "--params", str(pfile)], check=True,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    t_cli = time.time() - t
    ours = json.loads((work / "fer_model" / "metrics.json").read_text())["cv"]["macro_f1_mean"]

    data = load_dataset([str(store)])
    x, y = data.features, data.labels
    fold = make_folds(labels=y, groups=None, sha256=data.sha256, n_folds=5, class_names=data.class_names,
                      random_state=params.cv.seed)
    t = time.time()
    f1s = []
    for k in range(5):
        tr, te = fold != k, fold == k
        sc = StandardScaler().fit(x[tr])
        lr = LogisticRegression(max_iter=1000).fit(sc.transform(x[tr]), y[tr])
        f1s.append(f1_score(y[te], lr.predict(sc.transform(x[te])), average="macro"))
    t_lr = time.time() - t

    grid = list(itertools.product([1e-3, 3e-3], [(), (256,), (512,)], [0.2, 0.5]))[: 0 if args.skip_sweep else None]
    t = time.time()
    best = None
    for lr_, hidden, drop in grid:
        p = dataclasses.replace(params, head=dataclasses.replace(params.head, lr=lr_, hidden=hidden, dropout=drop))
        cv = cross_validate(features=x, labels=y, fold=fold, class_names=data.class_names, params=p)
        f1 = float(np.mean([f["macro_f1"] for f in cv.folds]))
        best = max(best or (f1, ""), (f1, f"lr={lr_} hidden={list(hidden)} dropout={drop}"))
    t_sweep = time.time() - t
    best = best or (float("nan"), "skipped")

    print(f"store {N} x {D}, {C} classes, 5-fold CV, {os.cpu_count()} CPUs")
    print(f"(a) imgsent train-head (defaults, incl. store read + final fit): {t_cli:6.1f} s  macro-F1 {ours:.3f}"
          f"   target <= 10 s: {'met' if t_cli <= 10 else 'NOT met'}")
    print(f"(b) sklearn LogisticRegression(max_iter=1000) 5-fold:            {t_lr:6.1f} s  macro-F1 {np.mean(f1s):.3f}")
    print(f"    ratio LR / ours: {t_lr / t_cli:.1f}x   macro-F1 ours - LR: {ours - np.mean(f1s):+.3f}")
    print(f"(c) sweep of {len(grid)} head configs x 5 folds (features read once): {t_sweep:6.1f} s"
          f"   target <= 60 s: {'met' if t_sweep <= 60 else 'NOT met'}; best {best[1]} macro-F1 {best[0]:.3f}")


if __name__ == "__main__":
    main()
