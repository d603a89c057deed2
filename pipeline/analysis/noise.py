"""The noise beside a number: Student's t quantiles without scipy, and the interval of a difference between two
candidates scored on the same folds or batches. Every choice (a head, a transform, a config) and every early
stop is made outside it (pipeline/selection/)."""
from __future__ import annotations

import numpy as np

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
