"""Cross-validation of one head config: one fit per fold, each held-out source adapted under every transform
(heads/adapt.py), and the stress batches that adaptation can fail on; and the early stop of a candidate clearly
behind. The choices made from it are pipeline/selection/rules.py's.

    cand = cross_validate(rows, fold, params, transforms, ...)   one fit per fold; every transform per fold
    run = start_cv(pool, rows, fold, params, ...)                  the same folds' tasks queued on a FoldPool
    cand = cross_validate(..., run=run)                            ...and read (selection/foldwork.py)

A source in CV is a manifest group (each held-out group adapted by its own statistics), or without groups each
fold's test part (data/folds.cv_sources). Stress batches come from held-out sources: one class making 60% of the
batch, two classes only, 5 and 10 random images.
"""
from __future__ import annotations

import itertools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from features.input.prefetch import available_cores
from features.timing import Phases
from pipeline.analysis.metrics import classification_metrics
from pipeline.analysis.noise import T995, paired_difference
from pipeline.heads.adapt import many_sources_logits_each, source_logits_each
from pipeline.heads.fitting import FoldViews, aligns, fit_rows
from pipeline.heads.head import one_blas_thread
from pipeline.heads.sources import rows_logits_each
from pipeline.params import Params
from pipeline.selection.foldwork import FoldPool, Run, Task
from pipeline.transforms import NONE, adapts

STRESS = ("one class at 60%", "two classes", "5 images", "10 images")
STRESS_MAX = 256  # images per stress batch
PER_KIND = 10  # skewed stress batches of each kind per source (one class at 60%, two classes)
DRAWS = 30  # random draws of 5 and of 10 images per source
ALONE_ROWS = 64  # a stress batch of this many images or more is adapted alone, smaller ones many at a time...
MANY_ROWS = 4096  # ...at most this many rows together: a few (R, 1280) copies, ~130 MB, per core


@dataclass
class Candidate:
    """One head config's CV: out-of-fold logits (N, C) per transform (0 for unlabelled rows), per-fold metrics,
    stress accuracy per transform and kind, per row what its out-of-fold prediction rested on; and the rows' labels,
    sources and whether their fold was scored (a CV stopped early leaves some unscored)."""
    params: Params
    oof: dict[str, np.ndarray]
    per_fold: dict[str, list[dict]]
    stress: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # accuracy per batch, the same
    # batches in the same order for every transform; {}: not scored (score_stress_batches)
    said: dict[str, list[str]] = field(default_factory=dict)
    stopped: str | None = None  # why its CV ended before the last fold (cross_validate's give_up)
    labels: np.ndarray | None = None  # (N,) -1 = unlabelled
    sources: np.ndarray | None = None  # (N,) data/folds.cv_sources
    scored: np.ndarray | None = None  # (N,) bool
    heads: dict = field(default_factory=dict)  # fold -> its head, kept for the stress batches (score_stress_batches)

    def f1s(self, transform: str) -> list[float]:
        return [f["macro_f1"] for f in self.per_fold[transform]]

    def capped(self) -> int:
        """Its fold fits that ran all head.epochs before their stop rule decided (Head.capped)."""
        return sum(h.capped for h in self.heads.values())


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


def fold_task(rows, fold: np.ndarray, params: Params, transforms: tuple[str, ...], max_val: int | None,
              views: FoldViews) -> Task:
    """Fold j's task (foldwork.Task): its head (params.head, hidden resolved), fitted on the other folds' labelled
    rows, and its held-out rows predicted under every transform, each source adapted on its own
    (heads/sources.py) -> (head, rows_logits_each's result); None once its CV gave up (stopped())."""
    lab, sources, align = rows.labels >= 0, views.sources, params.head.align
    adapting = any(map(adapts, transforms))  # else no reference statistics and no stress batches are needed

    def task(j: int, stopped) -> tuple | None:
        view = views.get(j, align) if adapting or aligns(rows, align) else None  # what the head is fitted on and
        # a source adapted to: the fold's training rows, whatever the head
        head = fit_rows(rows, lab & (fold != j), params.head, params.cv.seed + j, max_val, reference=adapting,
                        view=view, stop=stopped)
        return None if stopped() else (head, rows_logits_each(head, rows, fold == j, sources, transforms))
    return task


def start_cv(pool: FoldPool, rows, fold: np.ndarray, params: Params, transforms: tuple[str, ...],
             max_val: int | None, views: FoldViews) -> Run:
    """Every fold's task queued on `pool`, for cross_validate to read (choose_head queues each head's before
    reading the first). `views`: as cross_validate's, the same one."""
    return pool.start(fold_task(rows, fold, params, transforms, max_val, views), range(int(fold.max()) + 1))


def cross_validate(rows, fold: np.ndarray, params: Params, transforms: tuple[str, ...], max_val: int | None,
                   on_fold=lambda: None, stress: bool = True, phases: Phases | None = None,
                   views: FoldViews | None = None, give_up=lambda cand: None, run: Run | None = None) -> Candidate:
    """One head per fold (fold_task), its held-out rows predicted under every transform and, with `stress`, its
    stress batches scored once every fold is (score_stress_batches; choose_head scores them itself, for a head
    that may yet be chosen only). `views`: each fold's training rows as the head sees them (aligned or not) and
    their statistics (fitting.FoldViews of these folds): pass the same one to every head CV'd on these folds and
    each is computed once. give_up(cand) after each fold: a reason to stop this CV there (cand.stopped), or None;
    its tasks still queued or running then stop (foldwork.Run.stop). `max_val`: the rows a streamed store's fit
    holds at once, for its early-stopping slice and its stress batches (None in memory). `run`: the folds' tasks,
    queued by start_cv with the same arguments; without it, a FoldPool of its own."""
    views = FoldViews(rows, fold) if views is None else views
    if run is None:
        with FoldPool(rows, params) as pool:
            run = start_cv(pool, rows, fold, params, transforms, max_val, views)
            return cross_validate(rows, fold, params, transforms, max_val, on_fold, stress, phases, views, give_up,
                                  run)
    names, folds, phases = rows.class_names, int(fold.max()) + 1, phases or Phases()
    lab = rows.labels >= 0
    cand = Candidate(params, {t: np.zeros((len(rows), len(names)), np.float32) for t in transforms},
                     {t: [] for t in transforms}, said={t: [""] * len(rows) for t in transforms},
                     labels=rows.labels, sources=views.sources, scored=np.zeros(len(rows), bool))
    with phases(f"CV {list(params.head.hidden)}"):  # the wall time this head's results were waited for
        for j, (head, adapted) in run.results():
            cand.heads[j], te = head, fold == j
            cand.scored |= te & lab
            for t, (logits, said, _) in adapted.items():
                cand.oof[t][te] = logits
                for i, s in zip(np.flatnonzero(te), said):
                    cand.said[t][i] = s
                m = classification_metrics(rows.labels[te], logits.argmax(1), names)
                cand.per_fold[t].append({"fold": j, "n": m["n"], "accuracy": m["accuracy"], "macro_f1": m["macro_f1"]})
            on_fold()
            cand.stopped = give_up(cand) if j < folds - 1 else None
            if cand.stopped:
                run.stop()
                break
    if stress:
        score_stress_batches(cand, rows, fold, max_val, phases)
    return cand


def score_stress_batches(cand: Candidate, rows, fold: np.ndarray, max_val: int | None = None,
                         phases: Phases | None = None) -> None:
    """cand.stress: each fold's head (cand.heads) on stress batches of the fold's held-out sources, under none and
    each of cand's transforms; nothing where no transform adapts (they measure what adapting costs against none).
    The batches are drawn fold by fold from a generator of the CV's seed: the same ones whenever they are scored.
    `max_val`: the rows a streamed store's fit holds at once (score_stress)."""
    transforms = tuple(dict.fromkeys((NONE, *cand.oof)))  # stress batches are scored against none as well
    hits: dict[str, dict[str, list[float]]] = {t: {k: [] for k in STRESS} for t in transforms}
    rng, sources, phases = np.random.default_rng(cand.params.cv.seed), cand.sources, phases or Phases()
    for j, head in sorted(cand.heads.items()) if any(map(adapts, transforms)) else ():
        te = fold == j
        batches = [b for s in np.unique(sources[te]) for b in
                   stress_batches(rows.labels, np.flatnonzero(te & (sources == s)), rng)]
        if batches:
            with phases("stress batches"):
                score_stress(head, rows, batches, transforms, hits, max_val)
    cand.stress = {t: {k: v for k, v in per.items() if v} for t, per in hits.items()}


def score_stress(head, rows, batches: list[tuple[str, np.ndarray]], transforms: tuple[str, ...],
                 hits: dict[str, dict[str, list[float]]], max_rows: int | None = None) -> None:
    """Append each batch's accuracy under each transform to hits[transform][kind], in the batches' order. Their
    rows are read once (a streamed store: one pass), or, past `max_rows` rows (cross_validate gives a streamed
    store a quarter of the memory budget), in parts of consecutive batches that fit, one pass each."""
    sizes = np.array([len(b) for _, b in batches])
    cut = np.cumsum(sizes) // max_rows if max_rows else np.zeros(len(batches), int)
    accuracy = {t: np.zeros(len(batches)) for t in transforms}  # (B,) each
    for part in np.split(np.arange(len(batches)), np.flatnonzero(np.diff(cut)) + 1):
        for t, a in _score_part(head, rows, [batches[i] for i in part], transforms).items():
            accuracy[t][part] = a
    for t, acc in accuracy.items():
        for (kind, _), a in zip(batches, acc):
            hits[t][kind].append(float(a))


def _score_part(head, rows, batches: list[tuple[str, np.ndarray]], transforms: tuple[str, ...]
                ) -> dict[str, np.ndarray]:
    """Per transform, the accuracy (B,) of each batch adapted on its own: one of ALONE_ROWS images or more alone
    (adapt.source_logits_each), the smaller ones many at a time, at most MANY_ROWS rows together
    (adapt.many_sources_logits_each: 5 images alone cost what 150 do at once, and 256 cost more at once than
    alone). The work is spread over the cores on one BLAS thread each (numpy lets go of the GIL in a product;
    OpenBLAS's spinning threads on products this small were slower under load, heads/head.blas_threads_for)."""
    union = np.zeros(len(rows), bool)
    for _, b in batches:
        union[b] = True
    x, where = rows.take(union), np.cumsum(union) - 1  # (U, D); row -> its place in x
    sizes = np.array([len(b) for _, b in batches])
    small = np.flatnonzero(sizes < ALONE_ROWS)
    parts = max(available_cores(), -(-int(sizes[small].sum()) // MANY_ROWS))
    groups = [np.array([i]) for i in np.flatnonzero(sizes >= ALONE_ROWS)] + \
        [g for g in np.array_split(small, max(1, min(len(small), parts))) if len(g)]

    def score(group: np.ndarray) -> dict[str, np.ndarray]:  # transform -> accuracy (G,) of the group's batches
        b = np.concatenate([batches[i][1] for i in group])  # (R,) store rows
        logits = ({t: lg for t, (lg, _) in source_logits_each(head, x[where[b]], transforms).items()}
                  if sizes[group[0]] >= ALONE_ROWS else
                  many_sources_logits_each(head, x[where[b]], sizes[group], transforms))
        starts = np.cumsum(sizes[group]) - sizes[group]
        return {t: np.add.reduceat(lg.argmax(1) == rows.labels[b], starts) / sizes[group] for t, lg in logits.items()}
    accuracy = {t: np.zeros(len(batches)) for t in transforms}  # (B,) each
    with one_blas_thread(), ThreadPoolExecutor(available_cores()) as pool:
        for group, acc in zip(groups, pool.map(score, groups)):
            for t, a in acc.items():
                accuracy[t][group] = a
    return accuracy


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


def behind_any(leaders: list[tuple[str, list[float]]], folds: int):
    """A give_up for cross_validate: behind(name, scores, folds) for each of `leaders`, the first reason to stop."""
    checks = [behind(name, scores, folds) for name, scores in leaders]
    return lambda cand: next((why for why in (check(cand) for check in checks) if why), None)
