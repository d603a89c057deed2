"""How adaptation estimates a batch's class mix (issue #31), side by side on the same heads: counting the head's
answers (classify and count, Forman 2008: heads/adapt.class_mix), its mean probability (probabilistic classify
and count, Bella et al. 2010: until 2026-12-03), and Saerens et al. 2002's EM re-weighting of those probabilities.

    python benchmarks/loso_class_mix.py [--data ...] [--backbones ...] [--seeds 0 1 2]

Leave-one-style-out on the shared emoji as benchmarks/loso.py (its stores under --work), with the head fixed to
`[256]` and the transform to `affine`, so that only the estimator differs: macro-F1 on the held-out style (± the
std over seeds) and accuracy on its batches, each against no adaptation; then the worst of the four stress-batch
differences (one class at 60%, two classes, 5 and 10 images), and how far each estimate is from the batch's true
class mix (total variation) on the whole style and on the skewed batches. The `none` row's distances are the
training class mix's: every shared style holds the same emoji, so a whole held-out style has the training mix,
which favours an estimate that leans toward it; a user's folder need not.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from loso import arguments, feature_sets, score  # noqa: E402
from pipeline.selection.crossval import STRESS, stress_batches  # noqa: E402
from pipeline.data.rows import open_rows  # noqa: E402
from pipeline.heads import adapt  # noqa: E402
from pipeline.heads.fitting import fit_rows  # noqa: E402
from pipeline.heads.head import softmax  # noqa: E402
from pipeline.params import load_params  # noqa: E402


def mean_probability(head, xs, n: int) -> np.ndarray:
    return sum(softmax(head.logits(x)).sum(0, dtype=np.float64) for x in xs) / n


def saerens_em(head, xs, n: int, steps: int = 20) -> np.ndarray:
    """The class mix q maximising the batch's likelihood under label shift: posteriors re-weighted by q / prior."""
    p = np.concatenate([softmax(head.logits(x)) for x in xs]).astype(np.float64)  # (n, C)
    prior = head.reference.prior.astype(np.float64)
    q = prior
    for _ in range(steps):
        w = p * (q / prior)
        q = (w / w.sum(1, keepdims=True)).mean(0)
    return q


def mix_error(head, x: np.ndarray, y: np.ndarray, rng: np.random.Generator, prior: bool = False) -> dict[str, float]:
    """Total variation between the estimated class mix (adapt: affine) and the true one: the whole style, and the
    mean over its skewed stress batches (one class at 60%, two classes). prior: the training class mix instead."""
    def tv(rows: np.ndarray) -> float:
        true = np.bincount(y[rows], minlength=head.n_classes) / len(rows)
        est = head.reference.prior if prior else adapt.source_logits(head, x[rows], "affine")[1].class_mix
        return 0.5 * float(np.abs(est - true).sum())
    skewed = [tv(b) for kind, b in stress_batches(y, np.arange(len(y)), rng) if kind in STRESS[:2]]
    return {"mix error, whole": tv(np.arange(len(y))), "mix error, skewed": float(np.mean(skewed))}


ESTIMATORS = {"counts (default)": adapt.class_mix, "mean probability": mean_probability, "Saerens EM": saerens_em}


def main() -> None:
    args = arguments(argparse.ArgumentParser()).parse_args()
    params = load_params(str(ROOT / "params.yaml"))
    head_params = dataclasses.replace(params.head, hidden=(256,))
    for data in map(Path, args.data):
        for name, paths in feature_sets(data, args.backbones, args.work).items():
            rows = open_rows(paths)
            groups = np.asarray(rows.groups)
            res: dict[str, list[dict]] = {}  # estimator -> per seed, the mean over styles of score()
            for seed in args.seeds:
                per: dict[str, list[dict]] = {}
                for style in sorted(set(groups)):
                    te = groups == style
                    head = fit_rows(rows, ~te, head_params, seed)
                    x, y = rows.features[te], rows.labels[te]
                    per.setdefault("none", []).append(score(head, x, y, "none", np.random.default_rng(seed))
                                                      | mix_error(head, x, y, np.random.default_rng(seed), True))
                    for key, estimator in ESTIMATORS.items():
                        adapt.class_mix = estimator  # fit_shift looks it up at each call
                        try:
                            per.setdefault(key, []).append(score(head, x, y, "affine", np.random.default_rng(seed))
                                                           | mix_error(head, x, y, np.random.default_rng(seed)))
                        finally:
                            adapt.class_mix = ESTIMATORS["counts (default)"]
                for key, scores in per.items():
                    res.setdefault(key, []).append({k: np.mean([s[k] for s in scores]) for k in scores[0]})
            mean = {key: {k: np.mean([s[k] for s in seeds]) for k in seeds[0]} for key, seeds in res.items()}
            print(f"\n{data.name} {name}: [256] affine, {len(set(groups))} styles x {len(args.seeds)} seeds")
            print(f"{'':18s} {'macro-F1':>14s}  " + " ".join(f"{k:>17s}" for k in ("whole", *STRESS))
                  + f" {'worst vs none':>14s} {'mix error, whole':>17s} {'mix error, skewed':>18s}")
            for key, seeds in res.items():
                f1 = [s["F1"] for s in seeds]
                worst = min(mean[key][k] - mean["none"][k] for k in STRESS)
                print(f"{key:18s} {np.mean(f1):7.3f} ± {np.std(f1):.3f}  "
                      + " ".join(f"{mean[key][k]:17.3f}" for k in ("whole", *STRESS))
                      + (f" {'':>14s}" if key == "none" else f" {worst:+14.3f}")
                      + f" {mean[key]['mix error, whole']:17.3f} {mean[key]['mix error, skewed']:18.3f}", flush=True)


if __name__ == "__main__":
    main()
