"""The noise beside a number: Student's t quantiles without scipy, the interval of a difference between two
candidates scored on the same folds or batches, and of the difference between their worst held-out sources;
the interval of a held-out score over the images that happened to be in the set (bootstrap_ci).
Every choice (a head, a transform, a config) and every early stop is made outside it (pipeline/selection/)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.analysis.metrics import classification_metrics

# Student's t 97.5% quantiles for 1-9 degrees of freedom (scipy.stats.t.ppf(0.975, df); its import costs 1.2 s)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
# ...and 99.5%: the 99% interval that a CV stopped early must clear (a look after each fold is a test of its own)
T995 = {1: 63.657, 2: 9.925, 3: 5.841, 4: 4.604, 5: 4.032, 6: 3.707, 7: 3.499, 8: 3.355, 9: 3.250}


def t975(df: int, table: dict[int, float] = T975, z: float = 1.959964) -> float:
    """Student's t 97.5% quantile (or another `table`'s, with its normal quantile z): the table, or beyond it the
    Cornish-Fisher expansion around the normal quantile to 1/df^3 (within 0.0002 of scipy's at 97.5%, 0.0013 at
    99.5%)."""
    if df in table:
        return table[df]
    return (z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2) +
            (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * df ** 3))


def paired_difference(a: list[float], b: list[float], table: dict[int, float] = T975, z: float = 1.959964
                      ) -> tuple[float, float]:
    """(mean over folds of a - b, the half-width of its 95% interval): the fold-to-fold noise of a difference
    between two candidates scored on the same folds (or batches). Student's t with n - 1 degrees of freedom times
    the standard error: with 3 folds t is 4.30, and two standard errors, the normal quantile, would call a win
    what one run in five shows by chance (p = 0.18); with many stress batches t is about 2."""
    d = np.asarray(a) - np.asarray(b)
    n = len(d)
    return float(d.mean()), float(t975(n - 1, table, z) * d.std(ddof=1) / np.sqrt(n)) if n > 1 else float("inf")


WORST_DRAWS = 200  # bootstrap draws of the held-out images for the worst-source interval


@dataclass(frozen=True)
class WorstSource:
    """Two candidates' worst held-out source, and the 95% bootstrap interval of b's worst minus a's."""
    a: float  # macro-F1 of a on its worst source
    a_source: str
    b: float
    b_source: str
    lo: float  # interval of (b's worst) - (a's worst)
    hi: float


def _macro_f1(weights: np.ndarray, y: np.ndarray, pred: np.ndarray, c: int) -> np.ndarray:
    """Macro-F1 (D,) of predictions pred (k,) of labels y (k,) under each row of weights (D, k) (how many images
    each (label, prediction) cell holds in each draw), over the classes each draw holds or predicts: a source
    without some class is not marked down for it."""
    tp, support, predicted = (np.zeros((len(weights), c)) for _ in range(3))  # (D, C) each
    hit = y == pred
    np.add.at(tp, (slice(None), y[hit]), weights[:, hit])
    np.add.at(support, (slice(None), y), weights)
    np.add.at(predicted, (slice(None), pred), weights)
    seen = support + predicted > 0
    f1 = np.divide(2 * tp, support + predicted, out=np.zeros_like(tp), where=seen)
    return f1.sum(1) / np.maximum(seen.sum(1), 1)


def source_cells(y: np.ndarray, pred_a: np.ndarray, pred_b: np.ndarray, c: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One source's images as (label, a's prediction, b's prediction) cells, (k,) each, and their counts (k,)."""
    cells, counts = np.unique((y * c + pred_a) * c + pred_b, return_counts=True)
    return cells // (c * c), cells // c % c, cells % c, counts


def weakest_source(y: np.ndarray, pred: np.ndarray, sources: np.ndarray, c: int) -> tuple[str, float]:
    """(the source, its macro-F1) where predictions pred (n,) of labels y (n,) score lowest, without the noise."""
    scores = {}
    for s in np.unique(sources):
        m = sources == s
        label, p, _, counts = source_cells(y[m], pred[m], pred[m], c)
        scores[str(s)] = float(_macro_f1(counts[None].astype(float), label, p, c)[0])
    name = min(scores, key=scores.get)
    return name, scores[name]


def worst_source(y: np.ndarray, pred_a: np.ndarray, pred_b: np.ndarray, sources: np.ndarray, c: int,
                 random_state: int = 0) -> WorstSource:
    """The lowest per-source macro-F1 of predictions a and of b (y, pred_*, sources: (n,) over the same held-out
    images), with the interval of their difference from WORST_DRAWS bootstrap draws of each source's images (the
    same draws for both: paired). A draw of a source's images is a multinomial draw over its (label, a's
    prediction, b's prediction) cells, so memory is WORST_DRAWS x cells, not x images. A source of a few images
    is the worst by chance as often as by fact; its draws then spread wide and the interval says so."""
    rng = np.random.default_rng(random_state)
    names = np.unique(sources)
    point_a, point_b, draws_a, draws_b = [], [], [], []
    for s in names:
        m = sources == s
        label, a, b, counts = source_cells(y[m], pred_a[m], pred_b[m], c)  # (k,) each
        n = int(counts.sum())
        w = np.vstack([counts, rng.multinomial(n, counts / n, size=WORST_DRAWS)]).astype(float)  # (1 + D, k)
        fa, fb = _macro_f1(w, label, a, c), _macro_f1(w, label, b, c)
        point_a.append(fa[0]), point_b.append(fb[0]), draws_a.append(fa[1:]), draws_b.append(fb[1:])
    diff = np.min(draws_b, axis=0) - np.min(draws_a, axis=0)  # (D,)
    ia, ib = int(np.argmin(point_a)), int(np.argmin(point_b))
    return WorstSource(float(point_a[ia]), str(names[ia]), float(point_b[ib]), str(names[ib]),
                       float(np.percentile(diff, 2.5)), float(np.percentile(diff, 97.5)))


def bootstrap_ci(y: np.ndarray, pred: np.ndarray, n_classes: int, *, classes: np.ndarray | None = None,
                 n_boot: int = 1000, random_state: int = 0) -> dict[str, tuple[float, float]]:
    """95% percentile intervals of accuracy and macro-F1 (over `classes`, default all n_classes: evaluate's
    average over the classes present) when as many images are drawn again from these (N,), with replacement:
    how much a held-out score owes to which images happened to be in the set (46 images: +-0.13)."""
    rng = np.random.default_rng(random_state)
    names = [str(k) for k in range(n_classes)]
    keep = np.arange(n_classes) if classes is None else np.asarray(classes)
    acc, f1 = np.empty(n_boot), np.empty(n_boot)
    for b in range(n_boot):
        i = rng.integers(0, len(y), len(y))  # (N,) a draw of the images
        m = classification_metrics(y[i], pred[i], names)
        acc[b], f1[b] = m["accuracy"], np.array([v["f1"] for v in m["per_class"].values()])[keep].mean()
    q = lambda v: (float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5)))  # noqa: E731
    return {"accuracy": q(acc), "macro_f1": q(f1)}
