"""The choice rules: which transform and which head (or sweep config) CV's scores pick, never on a difference
inside the noise, and the record of why (details.json).

    t, why = choose_transform(cand)        the preferred transform that passes the stress batches, unless another
                                           beats it by more than the noise
    pick, why = prefer([(name, per-fold scores), ...])   the same rule for the head and for sweep's configs

A transform is refused when it loses more than STRESS_TOLERANCE accuracy against none on a kind of stress batch,
by more than the batch-to-batch noise (paired: the same batches either way).
"""
from __future__ import annotations

import numpy as np

from pipeline.analysis.noise import paired_difference, weakest_source, worst_source
from pipeline.selection.crossval import Candidate
from pipeline.transforms import NONE, REGISTRY

PREFERRED_TRANSFORMS = tuple(REGISTRY)  # on a tie, in this order (pipeline/transforms.py)
STRESS_TOLERANCE = 0.02  # accuracy a transform may lose against none on a stress batch


def prefer(options: list[tuple[str, list[float]]], worst=None) -> tuple[str, str]:
    """options: (name, per-fold scores) in order of preference. The first, unless the one with the highest mean
    beats it by more than the noise (paired_difference) without doing worse on the worst held-out source beyond
    that source's noise. The worst source weighs in as a veto only, never on a difference inside its noise:
    selection by the worst group (Sagawa et al. 2020) or held-out domain (Gulrajani & Lopez-Paz 2021) on a few
    sources of a few dozen images chooses by chance. As a tie-break it lost: it moved 3 of 15 leave-one-style-out
    runs of the FER features to the linear head and their mean from 0.610 to 0.571 (docs/evaluation.md).
    worst(a, b): the analysis/noise.WorstSource of option b against option a, or None where it is not known
    (the means decide). Returns (name, why)."""
    first = options[0]
    best = max(options, key=lambda o: np.mean(o[1]))
    if best is not first:
        diff, noise = paired_difference(best[1], first[1])
        if diff <= noise:
            return first[0], (f"a tie: {best[0]} was ahead of {first[0]} by {diff:.3f}, within the noise "
                              f"({noise:.3f}); {first[0]} by the tie rule")
        w = worst(first[0], best[0]) if worst else None
        if w is None or w.hi >= 0:
            return best[0], f"{best[0]} beat {first[0]} by {diff:.3f}, more than the noise ({noise:.3f})" + (
                f"; {_said(w, best[0], first[0])}" if w else "")
        return first[0], (f"{best[0]} beat {first[0]} by {diff:.3f} on the mean, more than the noise ({noise:.3f}), "
                          f"but did worse on the worst held-out source: {_said(w, best[0], first[0])}; "
                          f"{first[0]} kept")
    if len(options) == 1:
        return first[0], f"{first[0]} scored highest"
    runner = max(options[1:], key=lambda o: np.mean(o[1]))  # the first leads: beyond the noise, or a tie said so
    diff, noise = paired_difference(first[1], runner[1])
    if diff == 0:
        return first[0], (f"a tie: {first[0]} and {runner[0]} scored the same ({np.mean(first[1]):.3f}); "
                          f"{first[0]} by the tie rule")
    if diff <= noise:
        return first[0], (f"a tie: {first[0]} was ahead of {runner[0]} by {diff:.3f}, within the noise "
                          f"({noise:.3f}); {first[0]} by the tie rule")
    return first[0], (f"{first[0]} scored highest, ahead of {runner[0]} by {diff:.3f}, more than the noise "
                      f"({noise:.3f})")


def _said(w, b: str, a: str) -> str:
    """A WorstSource in words."""
    return (f"{b}'s worst source ({w.b_source}) scored {w.b:.3f}, {a}'s ({w.a_source}) {w.a:.3f}: {w.b - w.a:+.3f} "
            f"(95% interval {w.lo:+.3f} to {w.hi:+.3f})")


def weakest(cand: Candidate, transform: str) -> str:
    """details.json's worst held-out source of a CV under `transform`: 'name (macro-F1)'."""
    m = cand.scored
    name, f1 = weakest_source(cand.labels[m], cand.oof[transform][m].argmax(1), cand.sources[m],
                              cand.oof[transform].shape[1])
    return f"{name} ({f1:.3f})"


def align_said(cand: Candidate, grouped: bool) -> str:
    """details.json's adaptation.align: whether the head was fitted on each training group aligned, or why not."""
    if cand.params.head.adapt == NONE:
        return "none: adapt is none, nothing adapts a source at prediction"
    if cand.params.head.align == "none":
        return "none: set in params"
    if not grouped:
        return "none: no group column, nothing to align"
    return "groups: each training group aligned onto the training statistics before the head was fitted"


def worst_of(cvs: dict[str, tuple[Candidate, str]]):
    """The `worst` of prefer for options named in cvs (name -> its CV and transform), compared on the labelled rows
    both scored; None for an option not in cvs."""
    def worst(a: str, b: str):
        if a not in cvs or b not in cvs:
            return None
        (ca, ta), (cb, tb) = cvs[a], cvs[b]
        m = ca.scored & cb.scored
        return worst_source(ca.labels[m], ca.oof[ta][m].argmax(1), cb.oof[tb][m].argmax(1), ca.sources[m],
                            ca.oof[ta].shape[1]) if m.any() else None
    return worst


def stress_loss(cand: Candidate, transform: str) -> dict[str, tuple[float, float]]:
    """Per kind of stress batch: (mean accuracy of `transform` minus none's, its noise: paired_difference); none
    where cand's stress batches were not scored."""
    return {k: paired_difference(cand.stress[transform][k], cand.stress[NONE][k])
            for k in cand.stress.get(transform, {})}


def adaptation_record(cand: Candidate, transform: str, why: str, grouped: bool) -> dict:
    """details.json's `adaptation`: the transform chosen and why, what CV took as a source, whether the head was
    fitted on each training group aligned (heads/align.py), each transform's CV macro-F1, and its stress-batch
    accuracy, also against none (mean ± the half-width of its 95% interval)."""
    return {"transform": transform, "why": why, "sources": "manifest groups" if grouped else
            "each fold's test part (no groups: CV cannot measure a new source)", "align": align_said(cand, grouped),
            "cv_macro_f1": {t: round(float(np.mean(cand.f1s(t))), 4) for t in cand.oof},
            "stress_accuracy": {t: {k: round(float(np.mean(v)), 4) for k, v in acc.items()}
                                for t, acc in cand.stress.items()},
            "stress_vs_none": {t: {k: f"{d:+.3f} ± {n:.3f}" for k, (d, n) in stress_loss(cand, t).items()}
                               for t in cand.oof if t != NONE}}


def choose_transform(cand: Candidate) -> tuple[str, str]:
    """`adapt: auto`: the preferred transform (PREFERRED_TRANSFORMS) among those not refused on the stress batches
    (clearly worse than none by more than STRESS_TOLERANCE), unless another of them beats it by more than the
    noise. cand holds the transforms to choose from (every one, for auto) and none."""
    ok, refused = [], []
    for t in (t for t in PREFERRED_TRANSFORMS if t in cand.oof):
        bad = [(k, d) for k, (d, noise) in stress_loss(cand, t).items() if d + noise < -STRESS_TOLERANCE]
        (refused if bad and t != NONE else ok).append((t, bad))
    name, why = prefer([(t, cand.f1s(t)) for t, _ in ok], worst_of({t: (cand, t) for t, _ in ok}))
    return name, why + "".join(f"; {t} refused: {-d:.3f} less accuracy than none on '{k}' batches"
                               for t, bad in refused for k, d in bad[:1])
