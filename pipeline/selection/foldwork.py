"""CV's fold work on every core: a pool of workers that runs each fold's task (fit its head, predict its held-out
sources) and hands the results back in fold order, and a CV that gives up stops its tasks.

    with FoldPool(rows, params) as pool:
        run = pool.start(task, folds)      task(j, stopped) for each fold j, queued in order
        for j, result in run.results():    in fold order, each as soon as it is done
            ...
        run.stop()                         a CV that gave up: its tasks not started never start, and a running
                                           fit ends at its next check (stopped() turns True)

Why one pool for every head and every repeat: a head's k fits in rounds of one per core left a core idle in the
last round of an odd k (5 folds on 2 cores: the [256] head's fifth fit alone, about a fifth of a FER-like
train-head), and each held-out fold's adaptation waited for its round. Queued together, the linear head's tasks
first (its scores lead the later head's give-up check), every worker always has the next task (FER-like, 2 cores:
the two heads' CV 7.5 -> 6.0 s; docs/benchmarks.md); train-head queues each candidate's final fit behind them
(selection/heads.choose_head), sweep the next config's folds behind those of the config it reads. Each task is
deterministic on its own (its own generators, one torch thread, one BLAS thread), so the results do not depend on
which worker ran it or when.
"""
from __future__ import annotations

import contextlib
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterator, TypeVar

from features.input.prefetch import available_cores
from pipeline.data.memory import IN_MEMORY_COPIES, memory_budget
from pipeline.heads.head import one_blas_thread
from pipeline.params import Params

T = TypeVar("T")
Task = Callable[[int, Callable[[], bool]], T]  # task(fold, stopped) -> its result; stopped(): its CV gave up


def workers_for(rows, params: Params) -> int:
    """How many fold tasks run at once: on rows in memory one per core, as many as the memory budget holds a copy
    of the training rows for beyond the one data/memory.py counts (each fit standardises its own copy); a streamed
    store's fits read it one at a time, so 1 (and then its products use every core)."""
    if not rows.in_memory:
        return 1
    copy = 4 * len(rows.labels) * rows.dim  # bytes: a fit's float32 copy of its training rows, at most all of them
    spare = memory_budget(params.cv.memory_budget_mb) // copy - IN_MEMORY_COPIES
    return max(1, min(available_cores(), 1 + spare))


class Run:
    """One CV's tasks on a FoldPool: their futures in fold order, and the flag that stops them."""

    def __init__(self, futures: list[tuple[int, "Future | _Inline"]], stopped: threading.Event):
        self.futures, self.stopped = futures, stopped

    def results(self) -> Iterator[tuple[int, object]]:
        """(fold, its task's result) in fold order, each once it is done; a task's error is raised here."""
        for j, future in self.futures:
            yield j, future.result()

    def stop(self) -> None:
        """Tasks not started are dropped; a running one sees stopped() and ends its fit at the next check."""
        self.stopped.set()
        for _, future in self.futures:
            future.cancel()


class _Inline:
    """A task of a one-worker pool, run in the reader's thread when its result is asked for: nothing runs beside
    the reader (whose stress batches change the BLAS thread count while they run), and a streamed store is read
    by one fit at a time, whose products use every core."""

    def __init__(self, task: Task, j: int, stopped: Callable[[], bool]):
        self.task, self.j, self.stopped = task, j, stopped

    def result(self):
        return self.task(self.j, self.stopped)

    def cancel(self) -> bool:
        return True


class FoldPool:
    """Workers for fold tasks (workers_for, or `workers`). With more than one, numpy's products run on one BLAS
    thread each for the pool's life (a worker per core; threadpoolctl's limit is process-wide), so a task computes
    the same numbers whichever worker runs it and whatever runs beside it; with one, the tasks run in the reader's
    thread (_Inline). Leaving the pool stops every run on it, then waits for the tasks already running: an error
    or Ctrl-C in the reader leaves no fit behind."""

    def __init__(self, rows, params: Params, workers: int | None = None):
        self.workers = workers_for(rows, params) if workers is None else workers
        self._runs: list[Run] = []
        self._pool: ThreadPoolExecutor | None = None

    def __enter__(self) -> "FoldPool":
        self._stack = contextlib.ExitStack()
        if self.workers > 1:
            self._stack.enter_context(one_blas_thread())
            self._pool = self._stack.enter_context(ThreadPoolExecutor(self.workers))
        return self

    def __exit__(self, *exc) -> None:
        for run in self._runs:
            run.stop()
        self._stack.close()

    def start(self, task: Task, folds) -> Run:
        """Queue task(j, stopped) for each fold j in `folds`, behind every run started before."""
        stopped = threading.Event()
        run = Run([(j, self._pool.submit(task, j, stopped.is_set) if self._pool else _Inline(task, j, stopped.is_set))
                   for j in folds], stopped)
        self._runs.append(run)
        return run
