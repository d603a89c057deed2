"""How much memory a stage may use: the feature budget (cv.memory_budget_mb), what this process may still allocate,
and the per-class score arrays that live outside the budget, checked before the work."""
from __future__ import annotations

from features.errors import UserError

IN_MEMORY_COPIES = 2  # the rows in memory, plus one fit's copy of its training rows (heads/fitting.py)


def memory_budget(budget_mb: int) -> int:
    """Bytes of features the in-memory path may hold: the params value, or a quarter of available RAM."""
    if budget_mb > 0:
        return budget_mb << 20
    import psutil
    return int(psutil.virtual_memory().available * 0.25)


SCORE_COPIES = 8  # (N, C) float64 arrays' worth held at once: out-of-fold logits (float32) of 3 transforms x 2
# head candidates (selection/crossval.py), their labelled slice, probabilities before and after calibration, softmax
# temporaries; evaluate, report and suggest hold fewer


def available_memory() -> int:
    """Bytes this process may still allocate: free RAM, or less under a `ulimit -v` / `-d`."""
    import psutil
    free = psutil.virtual_memory().available
    try:
        import resource
    except ImportError:  # Windows
        return free
    me = psutil.Process().memory_info()
    for limit, used in ((resource.RLIMIT_AS, me.vms), (resource.RLIMIT_DATA, me.rss)):
        soft = resource.getrlimit(limit)[0]
        if soft != resource.RLIM_INFINITY:
            free = min(free, soft - used)
    return max(free, 0)


def check_score_memory(n: int, classes: int, where: str) -> None:
    """Per-image arrays live outside cv.memory_budget_mb (which bounds the features): labels and paths, and
    the per-class scores, SCORE_COPIES x 8 bytes x classes per image, the one that grows with the class count.
    Refuse in one line before the work when they cannot fit, rather than fail in it with MemoryError
    (10,000 classes x 10,000 images is 4.5 GiB)."""
    need, free = SCORE_COPIES * n * classes * 8, available_memory()
    if need > free:
        raise UserError(f"{where}: {n:,} images x {classes:,} classes need ~{need >> 20:,} MiB for their per-class "
                        f"scores, more than the {free >> 20:,} MiB this process may still allocate; merge or drop "
                        "rare classes, or run where there is more memory")
