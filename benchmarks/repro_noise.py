"""How far the demo's metrics move when nothing that matters changes: features moved by 1e-6 (relative; what
another CPU's rounding does to a store) and CV reseeded. This is the noise the fresh-clone test's tolerance and
train-head's reseeded spread must cover (README, tests/test_e2e.py).

    python benchmarks/repro_noise.py [--runs 8]
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from features.extract import extract  # noqa: E402
from pipeline.analysis.metrics import classification_metrics  # noqa: E402
from pipeline.data.folds import assign_folds  # noqa: E402
from pipeline.data.rows import open_rows  # noqa: E402
from pipeline.heads.sources import rows_logits  # noqa: E402
from pipeline.heads.fitting import fit_rows  # noqa: E402
from pipeline.params import load_params  # noqa: E402
from pipeline.selection.heads import choose_head  # noqa: E402


def run(train, test, params, seed: int, noise: float, rng: np.random.Generator) -> tuple[float, float, str]:
    """(CV macro-F1, held-out macro-F1, what was chosen) with every feature times (1 + noise * N(0, 1))."""
    jitter = lambda r: dataclasses.replace(  # noqa: E731
        r, features=(r.features * (1 + noise * rng.standard_normal(r.features.shape))).astype(np.float32))
    tr, te = jitter(train), jitter(test)
    p = dataclasses.replace(params, cv=dataclasses.replace(params.cv, seed=seed))
    fold = assign_folds(labels=tr.labels, groups=tr.groups, sha256=tr.sha256, k=p.cv.folds,
                        class_names=tr.class_names, random_state=seed)
    c = choose_head(tr, fold, p, None)
    chosen, cand, transform = c.params, c.cv, c.transform
    head = fit_rows(tr, tr.labels >= 0, chosen.head, seed)
    lab = te.labels >= 0
    pred = rows_logits(head, te, lab, None, transform)[0].argmax(1)
    held = classification_metrics(te.labels[lab], pred, te.class_names)["macro_f1"]
    return float(np.mean(cand.f1s(transform))), held, f"{list(chosen.head.hidden)} {transform}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=8)
    args = ap.parse_args()
    params = load_params(str(ROOT / "params.yaml"))
    work = ROOT / "out" / "bench" / "repro"
    stores = {}
    for part, images in (("train", ROOT / "data" / "demo" / "train.csv"), ("test", ROOT / "data" / "demo" / "test")):
        stores[part] = [str(work / f"{part}_{b}.h5") for b in params.extract.backbones]
        for b, s in zip(params.extract.backbones, stores[part]):
            extract(images=str(images), out=s, backbone=b, progress=False)
    train, test = open_rows(stores["train"]), open_rows(stores["test"], intersect=True)
    print(f"demo, {'+'.join(params.extract.backbones)}, params.yaml; {args.runs} runs each")
    for name, seeds, noise in (("1e-6 feature noise, seed 0", [0] * args.runs, 1e-6),
                               ("reseeded CV, no noise", list(range(args.runs)), 0.0)):
        rng = np.random.default_rng(1)
        out = [run(train, test, params, s, noise, rng) for s in seeds]
        cv, held = np.array([o[0] for o in out]), np.array([o[1] for o in out])
        print(f"{name:28s} CV macro-F1 {cv.mean():.4f} (std {cv.std():.4f}, range {cv.max() - cv.min():.4f}); held-out "
              f"{held.mean():.4f} (std {held.std():.4f}, range {held.max() - held.min():.4f}); chose "
              + ", ".join(sorted(set(o[2] for o in out))), flush=True)


if __name__ == "__main__":
    main()
