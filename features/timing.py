"""Wall-clock seconds per named phase of a run: train-head's breakdown (benchmarks/stage_two.py prints it)."""
from __future__ import annotations

import time
from contextlib import contextmanager


class Phases:
    """`with phases("final fit"): ...` adds the block's wall time to seconds["final fit"]. Phases are timed where
    they do not nest, so the values add up to the run's time less start-up and reading."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t
