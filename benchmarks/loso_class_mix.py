"""How adaptation estimates a source's class mix (issue #31) and where its steps start (issue #41), side by side on
the same heads:

  counts, as is (default)   the project's heads/adapt.py: count the head's answers (classify and count, Forman
                            2008), starting from its answers on the source as it is
  counts, training mix      the same counts, starting from the head's answers on the source shifted for the
                            training class mix (AdaBN's move, Li et al. 2016), then the same steps
  mean probability          the head's mean probability (probabilistic classify and count, Bella et al. 2010;
                            the estimator until 2026-12-03), starting as the default does
  Saerens EM                Saerens et al. 2002's EM re-weighting of those probabilities, starting likewise

    python benchmarks/loso_class_mix.py [--data ...] [--backbones ...] [--seeds 0 1 2] [--store GROUPED.h5 ...]

Leave-one-group-out on the shared emoji as benchmarks/loso.py (its stores under --work; the style is the group),
and on any grouped store given with --store (benchmarks/shift_families.py's, the family as the group), with the
head fixed to `[256]` and the transform to `affine`, so that only the estimate differs: macro-F1 on the held-out
group (± the std over seeds) and accuracy on its batches; the worst of the four stress-batch differences against
no adaptation (one class at 60%, two classes, 5 and 10 images); how far each estimate is from the true class mix
(total variation) on the whole group and on its skewed batches (the `none` row: the training mix's distance; a
whole held-out emoji style holds the training mix, which favours an estimate that leans toward it). Last, skewed
batches of a KNOWN source: one head on a random 80% of every group, the batches drawn from the other 20% of each
(a folder of mostly one class from a source the head was trained on, which a start from the training mix reads
as a change of style); `nan` where no group holds MIN_KNOWN images in its 20% (faces7). The stand-ins are built from adapt.py's own steps; the one with counts started as is gives
the project's logits bit for bit (checked on 6 held-out groups, 2026-12-07).
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
from pipeline.data.rows import open_rows  # noqa: E402
from pipeline.heads import adapt  # noqa: E402
from pipeline.heads.fitting import fit_rows  # noqa: E402
from pipeline.heads.head import softmax  # noqa: E402
from pipeline.params import load_params  # noqa: E402
from pipeline.selection.crossval import STRESS, stress_batches  # noqa: E402
from pipeline.transforms import adapts  # noqa: E402


def counts(logits: np.ndarray, prior: np.ndarray) -> np.ndarray:
    return np.bincount(logits.argmax(1), minlength=logits.shape[1]) / len(logits)


def mean_probability(logits: np.ndarray, prior: np.ndarray) -> np.ndarray:
    return softmax(logits).mean(0, dtype=np.float64)


def saerens_em(logits: np.ndarray, prior: np.ndarray, steps: int = 20) -> np.ndarray:
    """The class mix q maximising the batch's likelihood under label shift: posteriors re-weighted by q / prior."""
    p, q = softmax(logits).astype(np.float64), prior
    for _ in range(steps):
        w = p * (q / prior)
        q = (w / w.sum(1, keepdims=True)).mean(0)
    return q


def stand_in(estimate, start: str):
    """A stand-in for adapt._fit_shifts (what source_logits calls), built from adapt.py's own steps: the class
    mix estimated by `estimate` (logits (n, C), training prior (C,) -> (C,)), its steps started from the head's
    answers on the source 'as is' or shifted for the 'training mix'."""
    def fit_shifts(head, chunks, transforms):
        x = np.concatenate(list(chunks())).astype(np.float32)  # (n, D)
        n, prior = len(x), head.reference.prior.astype(np.float64)
        if n < adapt.MIN_IMAGES:
            return {}
        mean = x.sum(0, dtype=np.float64) / n
        var = np.maximum(np.einsum("ij,ij->j", x, x, dtype=np.float64) / n - mean ** 2, 0.0)
        out = {}
        for t in filter(adapts, transforms):
            def step(pi):  # the estimate on the source under pi's shift, and the logits it came from
                logits = adapt.shift_for(t, n, mean, var, head.reference, pi).adapt(head).logits(x)
                return estimate(logits, prior), logits
            first = estimate(head.logits(x), prior) if start == "as is" else step(prior)[0]
            pi, logits = adapt.settled(step, first)
            out[t] = (adapt.shift_for(t, n, mean, var, head.reference, pi), logits)
        return out
    return fit_shifts


PROJECT = adapt._fit_shifts
VARIANTS = {"counts, as is (default)": PROJECT, "counts, training mix": stand_in(counts, "training mix"),
            "mean probability": stand_in(mean_probability, "as is"), "Saerens EM": stand_in(saerens_em, "as is")}


def under(variant, fn, *a):
    adapt._fit_shifts = variant  # source_logits looks it up at each call
    try:
        return fn(*a)
    finally:
        adapt._fit_shifts = PROJECT


def mix_error(head, x: np.ndarray, y: np.ndarray, rng: np.random.Generator, prior: bool = False) -> dict[str, float]:
    """Total variation between the estimated class mix (adapt: affine) and the true one: the whole group, and the
    mean over its skewed stress batches (one class at 60%, two classes). prior: the training class mix instead."""
    def tv(rows: np.ndarray) -> float:
        true = np.bincount(y[rows], minlength=head.n_classes) / len(rows)
        est = head.reference.prior if prior else adapt.source_logits(head, x[rows], "affine")[1].class_mix
        return 0.5 * float(np.abs(est - true).sum())
    skewed = [tv(b) for kind, b in stress_batches(y, np.arange(len(y)), rng) if kind in STRESS[:2]]
    return {"mix error, whole": tv(np.arange(len(y))), "mix error, skewed": float(np.mean(skewed))}


MIN_KNOWN = 50  # held-out images a group needs for its skewed batches to be scored (faces7 holds about 10)


def known_source(rows, head_params, seed: int) -> dict[str, dict[str, float]]:
    """Per variant (and none): accuracy on the skewed stress batches of a known source, the mean over the groups
    with at least MIN_KNOWN images held out (nan where none has)."""
    rng = np.random.default_rng(seed)
    held = (rows.labels >= 0) & (rng.random(len(rows.labels)) < 0.2)
    head = fit_rows(dataclasses.replace(rows, labels=np.where(held, -1, rows.labels)), (rows.labels >= 0) & ~held,
                    head_params, seed)
    groups = np.asarray(rows.groups)
    out: dict[str, list[dict]] = {}
    for g in sorted(set(groups)):
        x, y = rows.features[held & (groups == g)], rows.labels[held & (groups == g)]
        batches = [(k, b) for k, b in stress_batches(y, np.arange(len(y)), np.random.default_rng(seed))
                   if k in STRESS[:2]] if len(y) >= MIN_KNOWN else []
        for key, variant in {"none": None, **VARIANTS}.items():
            t = "none" if variant is None else "affine"
            hits = {k: [] for k in STRESS[:2]}
            for k, b in batches:
                hits[k].append(float((under(variant or PROJECT, adapt.source_logits, head, x[b], t)[0].argmax(1)
                                      == y[b]).mean()))
            out.setdefault(key, []).append({f"known, {k}": np.mean(v) if v else np.nan for k, v in hits.items()})
    return {key: {k: float(np.nanmean([s[k] for s in per])) if np.isfinite([s[k] for s in per]).any() else np.nan
                  for k in per[0]} for key, per in out.items()}


def report(name: str, rows, head_params, seeds: list[int]) -> None:
    groups = np.asarray(rows.groups)
    res: dict[str, list[dict]] = {}  # row -> per seed, the mean over held-out groups
    for seed in seeds:
        per: dict[str, list[dict]] = {}
        for g in sorted(set(groups)):
            te = groups == g
            head = fit_rows(dataclasses.replace(rows, labels=np.where(te, -1, rows.labels)), ~te & (rows.labels >= 0),
                            head_params, seed)
            x, y = rows.features[te], rows.labels[te]
            per.setdefault("none", []).append(score(head, x, y, "none", np.random.default_rng(seed))
                                              | mix_error(head, x, y, np.random.default_rng(seed), True))
            for key, variant in VARIANTS.items():
                per.setdefault(key, []).append(under(variant, lambda: score(head, x, y, "affine",
                                                                            np.random.default_rng(seed))
                                                     | mix_error(head, x, y, np.random.default_rng(seed))))
        known = known_source(rows, head_params, seed)
        for key, scores in per.items():
            res.setdefault(key, []).append({k: np.mean([s[k] for s in scores]) for k in scores[0]} | known[key])
    mean = {key: {k: np.mean([s[k] for s in seeds_]) for k in seeds_[0]} for key, seeds_ in res.items()}
    cols = ("whole", *STRESS)
    print(f"\n{name}: [256] affine, {len(set(groups))} groups held out in turn x {len(seeds)} seeds")
    print(f"{'':24s} {'macro-F1':>14s} " + " ".join(f"{k[:14]:>14s}" for k in cols)
          + f" {'worst vs none':>13s} {'mix err whole':>13s} {'mix err skewed':>14s}"
          + f" {'known 60%':>9s} {'known 2 cl':>10s}")
    for key, seeds_ in res.items():
        f1, m = [s["F1"] for s in seeds_], mean[key]
        worst = min(m[k] - mean["none"][k] for k in STRESS)
        print(f"{key:24s} {np.mean(f1):7.3f} ± {np.std(f1):.3f} " + " ".join(f"{m[k]:14.3f}" for k in cols)
              + (f" {'':>13s}" if key == "none" else f" {worst:+13.3f}")
              + f" {m['mix error, whole']:13.3f} {m['mix error, skewed']:14.3f}"
              + f" {m['known, ' + STRESS[0]]:9.3f} {m['known, ' + STRESS[1]]:10.3f}", flush=True)


def main() -> None:
    ap = arguments(argparse.ArgumentParser())
    ap.add_argument("--store", nargs="*", default=[], help="more grouped stores, each group held out in turn")
    args = ap.parse_args()
    params = load_params(str(ROOT / "params.yaml"))
    head_params = dataclasses.replace(params.head, hidden=(256,))
    sets = {f"{Path(d).name} {name}": paths for d in args.data
            for name, paths in feature_sets(Path(d), args.backbones, args.work).items()}
    for name, paths in (sets | {Path(s).stem: [s] for s in args.store}).items():
        report(name, open_rows(paths), head_params, args.seeds)


if __name__ == "__main__":
    main()
