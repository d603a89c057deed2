"""The out-of-distribution check, measured: the fraction of images flagged (a) on an emoji style never seen in
training (leave-one-style-out over ../shared/data: should stay low) and (b) on images that are not emoji at all
(photos, noise, flat colours, rendered text: should be high), for the k-NN score predict uses and for a
Mahalanobis score (shared covariance, shrunk; distance to the nearest class mean), at several quantiles: k-NN raw
(predict's, since 2026-12-02), k-NN std (in the head's standardised space, predict's before), and k-NN of features
adapted to the training statistics (each batch adapted by 'affine' as predict adapts a folder, heads/adapt.py).

    python benchmarks/ood.py [--backbone efficientnet_lite0]

Needs the stores benchmarks/loso.py writes (it runs it if they are missing).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from features.extract import extract  # noqa: E402
from pipeline.inference.ood import MAX_REF, fit_ood, knn_distance, normalise  # noqa: E402
from pipeline.data.rows import open_rows  # noqa: E402
from pipeline.heads.adapt import source_logits  # noqa: E402
from pipeline.heads.fitting import fit_rows  # noqa: E402
from pipeline.params import load_params  # noqa: E402

QUANTILES = (0.95, 0.99, 0.999)
WORK = ROOT / "out" / "bench"


def strangers(folder: Path) -> Path:
    """Not emoji: scikit-learn's two sample photos and 8 crops of each, uniform noise, flat colours, text."""
    from sklearn.datasets import load_sample_images
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, img in zip(("china", "flower"), load_sample_images().images):
        Image.fromarray(img).save(folder / f"photo_{name}.jpg")
        h, w = img.shape[:2]
        for i in range(8):
            s = int(rng.integers(96, min(h, w)))
            y, x = int(rng.integers(0, h - s)), int(rng.integers(0, w - s))
            Image.fromarray(img[y:y + s, x:x + s]).save(folder / f"photo_{name}_crop{i}.jpg")
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (128, 128, 3)).astype(np.uint8)).save(folder / f"noise{i}.png")
        Image.new("RGB", (128, 128), tuple(int(v) for v in rng.integers(0, 256, 3))).save(folder / f"flat{i}.png")
        im = Image.new("RGB", (128, 128), "white")
        d = ImageDraw.Draw(im)
        for line in range(6):
            d.text((4, 6 + 20 * line), f"total {rng.integers(1000)} EUR", fill="black")
        im.save(folder / f"text{i}.png")
    return folder


def mahalanobis(train: np.ndarray, y: np.ndarray, shrink: float = 0.1):
    """score(x) = min over classes of the Mahalanobis distance to the class mean (shared, shrunk covariance)."""
    means = np.stack([train[y == c].mean(0) for c in np.unique(y)])  # (C, D)
    resid = train - means[np.searchsorted(np.unique(y), y)]
    cov = np.cov(resid, rowvar=False)
    cov = (1 - shrink) * cov + shrink * np.trace(cov) / len(cov) * np.eye(len(cov))
    prec = np.linalg.inv(cov)

    def score(x: np.ndarray) -> np.ndarray:
        d = x[:, None, :] - means[None]  # (N, C, D)
        return np.sqrt(np.einsum("ncd,de,nce->nc", d, prec, d).min(1))
    return score


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", default="efficientnet_lite0")
    args = ap.parse_args()
    far_store = WORK / "ood" / f"strangers_{args.backbone}.h5"
    extract(images=str(strangers(WORK / "ood" / "strangers")), out=str(far_store), backbone=args.backbone,
            progress=False)
    far = open_rows([str(far_store)]).features
    print(f"flagged fraction; k-NN = predict's score (k=10, <= {MAX_REF} reference rows), Mahalanobis for comparison;"
          f" a row per training set, the held-out style and {len(far)} non-emoji images")
    print(f"{'data':16s} {'held out':22s} {'score':12s} " + " ".join(f"{'q=' + str(q):>18s}" for q in QUANTILES))
    for data in ("emoji-faces7", "emoji-polarity3"):
        store = WORK / "loso" / f"{data}_{args.backbone}.h5"
        if not store.exists():
            subprocess.run([sys.executable, str(ROOT / "benchmarks" / "loso.py"), "--data",
                            str(ROOT.parent / "shared" / "data" / data), "--backbones", args.backbone], check=True)
        rows = open_rows([str(store)])
        groups = np.array(rows.groups)
        agg = {(k, q): [] for k in ("knn", "maha", "adapted", "raw") for q in QUANTILES}
        head_params = load_params(str(ROOT / "params.yaml")).head
        for style in sorted(set(groups)) + ["(none: all styles)"]:
            tr = groups != style
            x, y = rows.features[tr], rows.labels[tr]
            std = np.sqrt(x.var(0))
            var_mean = x.mean(0), np.maximum(std, 0.1 * std.mean() + 1e-12)  # as robust_scale
            def std(v):  # the head's standardised space, the score's space before 2026-12-02
                return (v - var_mean[0]) / var_mean[1]
            ref, loo = fit_ood([std(x)], len(x))
            held = rows.features[~tr]
            knn = {"held": knn_distance(normalise(std(held)), ref) if len(held) else np.zeros(0),
                   "far": knn_distance(normalise(std(far)), ref)}
            m = mahalanobis((x - var_mean[0]) / var_mean[1], y)
            own = m((x - var_mean[0]) / var_mean[1])
            maha = {"held": m((held - var_mean[0]) / var_mean[1]) if len(held) else np.zeros(0),
                    "far": m((far - var_mean[0]) / var_mean[1])}
            head = fit_rows(rows, tr, head_params.__class__(**{**head_params.__dict__, "hidden": (), "adapt": "affine"}), 0)

            def adapted(batch: np.ndarray) -> np.ndarray:  # the batch as predict adapts one folder
                shift = source_logits(head, batch, "affine")[1]
                return batch if shift is None else shift.apply(batch)
            raw_ref, raw_loo = fit_ood([x], len(x))  # predict's: raw features
            ada = {"held": knn_distance(normalise(adapted(held)), raw_ref) if len(held) else np.zeros(0),
                   "far": knn_distance(normalise(adapted(far)), raw_ref)}
            raw = {"held": knn_distance(normalise(held), raw_ref) if len(held) else np.zeros(0),
                   "far": knn_distance(normalise(far), raw_ref)}
            for name, sc, base in (("k-NN std", knn, loo), ("Mahalanobis", maha, own), ("k-NN adapted", ada, raw_loo),
                                   ("k-NN raw", raw, raw_loo)):
                cells = []
                for q in QUANTILES:
                    t = np.quantile(base, q)
                    held_f = float((sc["held"] > t).mean()) if len(sc["held"]) else float("nan")
                    far_f = float((sc["far"] > t).mean())
                    cells.append(f"{held_f:5.2f} / {far_f:5.2f}")
                    if len(sc["held"]):
                        agg[{"k-NN std": "knn", "Mahalanobis": "maha", "k-NN raw": "raw"}.get(name, "adapted"), q].append(
                            (held_f, far_f))
                print(f"{data:16s} {style:22s} {name:12s} " + " ".join(f"{c:>18s}" for c in cells), flush=True)
        for name, key in (("k-NN std", "knn"), ("Mahalanobis", "maha"), ("k-NN adapted", "adapted"), ("k-NN raw", "raw")):
            cells = [f"{np.mean([a for a, _ in agg[key, q]]):5.2f} / {np.mean([b for _, b in agg[key, q]]):5.2f}"
                     for q in QUANTILES]
            print(f"{data:16s} {'mean over styles':22s} {name:12s} " + " ".join(f"{c:>18s}" for c in cells))
    print("cells: held-out style flagged / non-emoji flagged")


if __name__ == "__main__":
    main()
