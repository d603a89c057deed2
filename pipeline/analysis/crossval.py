"""Cross-validation of head candidates with each held-out source adapted (heads/adapt.py), stress batches that
adaptation can fail on, and the choices of head and transform, which never hinge on a difference inside the
fold-to-fold noise.

    cand = cross_validate(rows, fold, params, transforms, ...)   one fit per fold; every transform per fold
    t, why = choose_transform(cand)        the preferred transform that passes the stress batches, unless another
                                           beats it by more than the noise
    pick, why = prefer([(name, per-fold scores), ...])   the same rule for the head

A source in CV is a manifest group (each held-out group adapted by its own statistics), or without groups each
fold's test part. Stress batches come from held-out sources: one class making 60% of the batch, two classes
only, 5 and 10 random images. A transform is refused when it loses more than STRESS_TOLERANCE accuracy against
none on a kind of stress batch, by more than the batch-to-batch noise (paired: the same batches either way).
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field

import numpy as np

from features.timing import Phases
from pipeline.analysis.metrics import classification_metrics
from pipeline.heads.adapt import rows_logits_each, source_logits_each
from pipeline.heads.fitting import TrainingView, aligns, fit_rows, training_view
from pipeline.params import Params
from pipeline.transforms import NONE, REGISTRY, adapts

PREFERRED_TRANSFORMS = tuple(REGISTRY)  # on a tie, in this order (pipeline/transforms.py)
STRESS_TOLERANCE = 0.02  # accuracy a transform may lose against none on a stress batch
STRESS = ("one class at 60%", "two classes", "5 images", "10 images")
STRESS_MAX = 256  # images per stress batch
PER_KIND = 10  # skewed stress batches of each kind per source (one class at 60%, two classes)
DRAWS = 30  # random draws of 5 and of 10 images per source
# Student's t 97.5% quantiles for 1-9 degrees of freedom (scipy.stats.t.ppf(0.975, df); its import costs 1.2 s)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
# ...and 99.5%: the 99% interval that a CV stopped early must clear (a look after each fold is a test of its own)
T995 = {1: 63.657, 2: 9.925, 3: 5.841, 4: 4.604, 5: 4.032, 6: 3.707, 7: 3.499, 8: 3.355, 9: 3.250}


@dataclass
class Candidate:
    """One head config's CV: out-of-fold logits (N, C) per transform (0 for unlabelled rows), per-fold metrics,
    stress accuracy per transform and kind, and per row what its out-of-fold prediction rested on."""
    params: Params
    oof: dict[str, np.ndarray]
    per_fold: dict[str, list[dict]]
    stress: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # accuracy per batch, the same
    # batches in the same order for every transform
    said: dict[str, list[str]] = field(default_factory=dict)
    stopped: str | None = None  # why its CV ended before the last fold (cross_validate's give_up)

    def f1s(self, transform: str) -> list[float]:
        return [f["macro_f1"] for f in self.per_fold[transform]]


def cv_sources(groups: list[str] | None, fold: np.ndarray) -> np.ndarray:
    """The source of each row in CV: its group, or without groups its fold (each fold's test part is one source)."""
    if groups is not None:
        return np.asarray(groups, dtype=str)
    return np.array([f"fold {j + 1}" for j in fold], dtype=str)


def stress_batches(labels: np.ndarray, members: np.ndarray, rng: np.random.Generator) -> list[tuple[str, np.ndarray]]:
    """(kind, rows) batches drawn from one source's rows `members` (labels (N,) index them): the class mixes and
    sizes that break test-time statistics (module docstring). Labels choose the rows, never the statistics."""
    y = labels[members]
    present = np.unique(y)
    out = []
    for c in rng.permutation(present)[:PER_KIND]:  # one class at 60%
        own, other = members[y == c], members[y != c]
        n_own = int(min(len(own), 1.5 * len(other), 0.6 * STRESS_MAX))
        n_other = int(round(n_own * 2 / 3))
        if n_own >= 3 and n_other >= 2:
            out.append((STRESS[0], np.concatenate([rng.choice(own, n_own, replace=False),
                                                   rng.choice(other, n_other, replace=False)])))
    pairs = list(itertools.combinations(present.tolist(), 2))
    for i in rng.permutation(len(pairs))[:PER_KIND]:  # two classes only
        both = members[np.isin(y, pairs[i])]
        out.append((STRESS[1], rng.choice(both, min(len(both), STRESS_MAX), replace=False)))
    for kind, size in ((STRESS[2], 5), (STRESS[3], 10)):  # few images
        if len(members) > size:
            out += [(kind, rng.choice(members, size, replace=False)) for _ in range(DRAWS)]
    return out


def cross_validate(rows, fold: np.ndarray, params: Params, transforms: tuple[str, ...], max_val: int | None,
                   on_fold=lambda: None, stress: bool = True, phases: Phases | None = None,
                   views: dict[tuple, TrainingView] | None = None, give_up=lambda cand: None) -> Candidate:
    """One head per fold (params.head, hidden resolved), its held-out rows predicted under every transform (each
    source adapted on its own) and, with `stress`, its stress batches scored (only when some transform adapts:
    they measure what adapting costs against none). `views`: each fold's training rows as the head sees them
    (aligned or not) and their statistics (fitting.training_view), by (fold, align), filled as needed: pass the
    same dict to every head CV'd on these folds and each is computed once.
    give_up(cand) after each fold: a reason to stop this CV there (cand.stopped), or None."""
    names, seed = rows.class_names, params.cv.seed
    lab = rows.labels >= 0
    sources = cv_sources(rows.groups, fold)
    cand = Candidate(params, {t: np.zeros((len(rows), len(names)), np.float32) for t in transforms},
                     {t: [] for t in transforms}, said={t: [""] * len(rows) for t in transforms})
    adapting = any(map(adapts, transforms))  # else no reference statistics and no stress batches are needed
    stress = stress and adapting
    scored = tuple(dict.fromkeys((NONE, *transforms)))  # stress batches are scored against none as well
    hits: dict[str, dict[str, list[float]]] = {t: {k: [] for k in STRESS} for t in scored}
    rng = np.random.default_rng(seed)
    phases, views = phases or Phases(), {} if views is None else views
    align = params.head.align
    for j in range(int(fold.max()) + 1):
        with phases(f"fit {list(params.head.hidden)}"):
            if adapting or aligns(rows, params.head):  # what the head is fitted on and a source adapted to: the
                # fold's training rows, whatever the head
                if (j, align) not in views:
                    views[j, align] = training_view(rows, lab & (fold != j), align)
            head = fit_rows(rows, lab & (fold != j), params.head, seed + j, max_val, reference=adapting,
                            view=views.get((j, align)))
        te = fold == j
        with phases("held-out sources adapted"):
            for t, (logits, said, _) in rows_logits_each(head, rows, te, sources, transforms).items():
                cand.oof[t][te] = logits
                for i, s in zip(np.flatnonzero(te), said):
                    cand.said[t][i] = s
                m = classification_metrics(rows.labels[te], cand.oof[t][te].argmax(1), names)
                cand.per_fold[t].append({"fold": j, "n": m["n"], "accuracy": m["accuracy"], "macro_f1": m["macro_f1"]})
        batches = [b for s in np.unique(sources[te]) for b in
                   stress_batches(rows.labels, np.flatnonzero(te & (sources == s)), rng)] if stress else []
        if batches:
            with phases("stress batches"):
                score_stress(head, rows, batches, scored, hits)
        on_fold()
        cand.stopped = give_up(cand) if j < int(fold.max()) else None
        if cand.stopped:
            break
    cand.stress = {t: {k: v for k, v in per.items() if v} for t, per in hits.items()}
    return cand


def score_stress(head, rows, batches: list[tuple[str, np.ndarray]], transforms: tuple[str, ...],
                 hits: dict[str, dict[str, list[float]]]) -> None:
    """Append each batch's accuracy under each transform to hits[transform][kind]. Every stress row is read once
    (a streamed store: one pass), then each batch adapted alone."""
    union = np.zeros(len(rows), bool)
    for _, b in batches:
        union[b] = True
    x, where = rows.take(union), np.cumsum(union) - 1  # (U, D); row -> its place in x
    for kind, b in batches:
        for t, (logits, _) in source_logits_each(head, x[where[b]], transforms).items():
            hits[t][kind].append(float((logits.argmax(1) == rows.labels[b]).mean()))


def t975(df: int, table: dict[int, float] = T975, z: float = 1.959964) -> float:
    """Student's t 97.5% quantile (or another `table`'s, with its normal quantile z): the table, or beyond it the
    Cornish-Fisher expansion around the normal quantile to 1/df^3 (within 0.0002 of scipy's at 97.5%, 0.0013 at
    99.5%)."""
    if df in table:
        return table[df]
    return (z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2) +
            (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * df ** 3))


def behind(leader: str, scores: list[float], folds: int):
    """A give_up for cross_validate: stop a candidate's CV once `leader` (per-fold scores on the same folds, all
    of them) beats it by more than the noise at 99%, from the second fold on (Student's t with 1 degree of freedom
    then asks for 45 standard deviations), on the candidate's best transform so far. A clearly losing
    hidden-layer head then costs 2 fits, not `folds` (100 classes x 100 images: [] 0.94, [256] 0.83)."""
    def check(cand: Candidate) -> str | None:
        n = len(next(iter(cand.per_fold.values())))
        if n < 2:
            return None
        best = max(cand.per_fold, key=lambda t: np.mean(cand.f1s(t)))
        diff, noise = paired_difference(scores[:n], cand.f1s(best), T995, 2.575829)
        return (f"its CV stopped after {n} of {folds} folds, {leader} ahead by {diff:.3f}, more than the noise at "
                f"99% ({noise:.3f})") if diff > noise else None
    return check


def paired_difference(a: list[float], b: list[float], table: dict[int, float] = T975, z: float = 1.959964
                      ) -> tuple[float, float]:
    """(mean over folds of a - b, the half-width of its 95% interval): the fold-to-fold noise of a difference
    between two candidates scored on the same folds (or batches). Student's t with n - 1 degrees of freedom times
    the standard error: with 3 folds t is 4.30, and two standard errors, the normal quantile, would call a win
    what one run in five shows by chance (p = 0.18); with many stress batches t is about 2."""
    d = np.asarray(a) - np.asarray(b)
    n = len(d)
    return float(d.mean()), float(t975(n - 1, table, z) * d.std(ddof=1) / np.sqrt(n)) if n > 1 else float("inf")


def prefer(options: list[tuple[str, list[float]]]) -> tuple[str, str]:
    """options: (name, per-fold scores) in order of preference. The first, unless the one with the highest mean
    beats it by more than the noise (paired_difference). Returns (name, why)."""
    first = options[0]
    best = max(options, key=lambda o: np.mean(o[1]))
    if best is first:  # the first leads: by more than the noise, or it is still a tie, said as one
        if len(options) == 1:
            return first[0], f"{first[0]} scored highest"
        runner = max(options[1:], key=lambda o: np.mean(o[1]))
        diff, noise = paired_difference(first[1], runner[1])
        if diff == 0:
            return first[0], (f"a tie: {first[0]} and {runner[0]} scored the same ({np.mean(first[1]):.3f}); "
                              f"{first[0]} by the tie rule")
        if diff <= noise:
            return first[0], (f"a tie: {first[0]} was ahead of {runner[0]} by {diff:.3f}, within the noise "
                              f"({noise:.3f}); {first[0]} by the tie rule")
        return first[0], (f"{first[0]} scored highest, ahead of {runner[0]} by {diff:.3f}, more than the noise "
                          f"({noise:.3f})")
    diff, noise = paired_difference(best[1], first[1])
    if diff > noise:
        return best[0], f"{best[0]} beat {first[0]} by {diff:.3f}, more than the noise ({noise:.3f})"
    return first[0], (f"a tie: {best[0]} was ahead of {first[0]} by {diff:.3f}, within the noise ({noise:.3f}); "
                      f"{first[0]} by the tie rule")


def stress_loss(cand: Candidate, transform: str) -> dict[str, tuple[float, float]]:
    """Per kind of stress batch: (mean accuracy of `transform` minus none's, its noise: paired_difference)."""
    return {k: paired_difference(cand.stress[transform][k], cand.stress[NONE][k]) for k in cand.stress[transform]}


def adaptation_record(cand: Candidate, transform: str, why: str, grouped: bool) -> dict:
    """details.json's `adaptation`: the transform chosen and why, what CV took as a source, whether the head was
    fitted on each training group aligned (heads/align.py), each transform's CV macro-F1, and its stress-batch
    accuracy, also against none (mean ± the half-width of its 95% interval)."""
    align = cand.params.head.align
    return {"transform": transform, "why": why, "sources": "manifest groups" if grouped else
            "each fold's test part (no groups: CV cannot measure a new source)",
            "align": "groups: each training group aligned onto the training statistics before the head was fitted"
            if grouped and align == "groups" else "none: set in params" if align == "none" else
            "none: no group column, nothing to align",
            "cv_macro_f1": {t: round(float(np.mean(cand.f1s(t))), 4) for t in cand.oof},
            "stress_accuracy": {t: {k: round(float(np.mean(v)), 4) for k, v in acc.items()}
                                for t, acc in cand.stress.items()},
            "stress_vs_none": {t: {k: f"{d:+.3f} ± {n:.3f}" for k, (d, n) in stress_loss(cand, t).items()}
                               for t in cand.oof if t != NONE}}


def choose_transform(cand: Candidate) -> tuple[str, str]:
    """`adapt: auto`: the preferred transform (PREFERRED_TRANSFORMS) among those not refused on the stress batches
    (clearly worse than none by more than STRESS_TOLERANCE), unless another of them beats it by more than the
    noise. cand holds every transform."""
    ok, refused = [], []
    for t in PREFERRED_TRANSFORMS:
        bad = [(k, d) for k, (d, noise) in stress_loss(cand, t).items() if d + noise < -STRESS_TOLERANCE]
        (refused if bad and t != NONE else ok).append((t, bad))
    name, why = prefer([(t, cand.f1s(t)) for t, _ in ok])
    return name, why + "".join(f"; {t} refused: {-d:.3f} less accuracy than none on '{k}' batches"
                               for t, bad in refused for k, d in bad[:1])

