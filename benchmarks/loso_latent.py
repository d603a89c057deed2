"""Measured and not adopted (issue #31): without a group column, let CV hold out *latent* sources, k-means
clusters of class-centred standardised features (the latent-domain idea of Matsuura & Harada 2020), instead of
random folds, so that auto's choice of head and transform sees images unlike the training ones.

    python benchmarks/loso_latent.py [--clusters 6] [--seeds 0 1 2]

Leave-one-style-out on the shared emoji as benchmarks/loso.py (its stores under --work): macro-F1 on the held-out
style of the head and transform train-head chooses with the style as the group ('grouped'), without the group
column ('none': random folds, today's behaviour) and with the clusters as the group ('latent').
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np
from sklearn.cluster import KMeans

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from loso import arguments, feature_sets, held_out, score  # noqa: E402
from pipeline.data.rows import open_rows  # noqa: E402
from pipeline.params import load_params  # noqa: E402


def latent_groups(rows, train: np.ndarray, style: str, clusters: int) -> list[str]:
    """A cluster name per training row (k-means of its features standardised, minus its class's mean); the
    held-out rows keep their style (held_out unlabels them, so no fold sees them)."""
    x = np.asarray(rows.features, np.float64)
    z = (x - x[train].mean(0)) / (x[train].std(0) + 1e-6)  # (N, D)
    for c in np.unique(rows.labels[train]):
        m = train & (rows.labels == c)
        z[m] -= z[m].mean(0)
    out = np.full(len(x), style, dtype=object)
    out[train] = [f"cluster {v}" for v in KMeans(clusters, n_init=4, random_state=0).fit_predict(z[train])]
    return list(out)


def main() -> None:
    ap = arguments(argparse.ArgumentParser())
    ap.add_argument("--clusters", type=int, default=6)
    args = ap.parse_args()
    params = load_params(str(ROOT / "params.yaml"))
    for data in map(Path, args.data):
        for name, paths in feature_sets(data, args.backbones, args.work).items():
            rows = open_rows(paths)
            styles = np.asarray(rows.groups)
            f1: dict[str, list[float]] = {"grouped": [], "none": [], "latent": []}
            for seed in args.seeds:
                for style in sorted(set(styles)):
                    te = styles == style
                    x, y = rows.features[te], rows.labels[te]
                    latent = dataclasses.replace(rows, groups=latent_groups(rows, ~te, style, args.clusters))
                    for kind, r in (("grouped", rows), ("none", rows), ("latent", latent)):
                        head, chosen = held_out(r, params, style, seed, grouped=kind != "none")
                        f1[kind].append(score(head, x, y, chosen.head.adapt, np.random.default_rng(seed))["F1"])
            print(f"{data.name} {name}: " + ", ".join(f"{k} {np.mean(v):.3f}" for k, v in f1.items()), flush=True)


if __name__ == "__main__":
    main()
