"""Issue #41's reference recipes, plain scikit-learn LogisticRegression on the stored features and no project code,
measured on the project's own held-out-source benchmarks, to set beside the default's figures (docs/evaluation.md):

  per-group    each training group standardised by its own mean and std, the held-out group by its own
  pooled       the training rows standardised together, the held-out group by its own mean and std

The issue measured both on two emoji designs outside shared/ (faces7 0.804 / 0.812, fused 0.851 / 0.820), where
the default of that day scored 0.658. Leave-one-group-out over the stores benchmarks/loso.py and
benchmarks/shift_families.py extract (run those first): per held-out group macro-F1, the mean and the worst;
then accuracy on the batches adaptation can fail on, each batch standardised by its own statistics as the recipe
standardises a folder: one class at 60%, two classes, 5 and 10 images (the batches loso.py draws for seeds 0-2,
so they pair with its `default` row), the mean over groups and seeds.
LogisticRegression(max_iter=3000), its defaults otherwise (C=1, L-BFGS): deterministic, so no seed spread.

    python benchmarks/reference_recipe.py [--loso out/bench/loso] [--families out/bench/families]
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pipeline.data.rows import open_rows  # noqa: E402
from pipeline.selection.crossval import STRESS, stress_batches  # noqa: E402 - the same batches as loso.py's

SEEDS = (0, 1, 2)  # loso.py's: its stress batches for these seeds


def standardised(x: np.ndarray) -> np.ndarray:
    """x (n, D) minus its mean, over its std (a constant dimension: over 1e-6)."""
    return (x - x.mean(0)) / (x.std(0) + 1e-6)


def leave_one_group_out(x: np.ndarray, y: np.ndarray, groups: np.ndarray) -> dict[str, dict[str, dict]]:
    """recipe -> held-out group -> {"F1": macro-F1 of LogisticRegression trained on every other group, and per
    kind of stress batch its mean accuracy over SEEDS, each batch standardised by its own statistics}."""
    out: dict[str, dict[str, dict]] = {"per-group": {}, "pooled": {}}
    for g in sorted(set(groups)):
        tr, te = groups != g, groups == g
        xg, yg = x[te], y[te]  # (n, D), (n,) the held-out group
        xt = standardised(xg)  # the held-out group by its own statistics, in both recipes
        each = np.empty_like(x[tr])
        for h in set(groups[tr]):
            each[groups[tr] == h] = standardised(x[tr][groups[tr] == h])
        batches = [b for seed in SEEDS for b in stress_batches(yg, np.arange(len(yg)), np.random.default_rng(seed))]
        for recipe, xtr in (("per-group", each), ("pooled", standardised(x[tr]))):
            lr = LogisticRegression(max_iter=3000).fit(xtr, y[tr])
            hits: dict[str, list[float]] = {k: [] for k in STRESS}
            for kind, b in batches:
                hits[kind].append(float((lr.predict(standardised(xg[b])) == yg[b]).mean()))
            out[recipe][g] = {"F1": float(f1_score(yg, lr.predict(xt), average="macro")),
                              **{k: float(np.mean(v)) for k, v in hits.items() if v}}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--loso", default="out/bench/loso", help="benchmarks/loso.py's --work")
    ap.add_argument("--families", default="out/bench/families", help="benchmarks/shift_families.py's --work")
    args = ap.parse_args()
    warnings.filterwarnings("ignore", category=ConvergenceWarning)
    sets = []
    for data in ("emoji-faces7", "emoji-polarity3"):
        lite0, fer = (str(Path(args.loso) / f"{data}_{b}.h5") for b in ("efficientnet_lite0", "fer_mini_xception"))
        sets += [(f"styles {data} {name}", paths) for name, paths in
                 (("lite0", [lite0]), ("fer", [fer]), ("fused", [lite0, fer]))]
        sets.append((f"families {data} lite0", [str(Path(args.families) / f"{data}_efficientnet_lite0.h5")]))
    for name, paths in sets:
        if not all(Path(p).exists() for p in paths):
            print(f"{name}: skipped, no store at {', '.join(paths)} (run loso.py / shift_families.py first)")
            continue
        rows = open_rows(paths)
        lab = rows.labels >= 0  # (N,) unlabelled rows take no part
        for recipe, per in leave_one_group_out(rows.features[lab], rows.labels[lab],
                                               np.asarray(rows.groups)[lab]).items():
            f1 = {g: r["F1"] for g, r in per.items()}
            cells = " ".join(f"{g} {f:.3f}" for g, f in f1.items())
            kinds = " ".join(f"{k} {np.mean([r[k] for r in per.values() if k in r]):.3f}" for k in STRESS)
            print(f"{name:36s} {recipe:9s} mean {np.mean(list(f1.values())):.3f} worst {min(f1.values()):.3f}"
                  f"   {cells}\n{'':46s} batches: {kinds}", flush=True)


if __name__ == "__main__":
    main()
