"""Synthetic stores for tests and benchmarks: Gaussian class mixtures written through `write_store`,
so they follow the real schema (checksums included) and nothing else writes it by hand."""
from __future__ import annotations

import hashlib
import os

import numpy as np

from features.storage.write import StoreContent, write_store


def synthetic_store(path: str | os.PathLike, *, n: int, dim: int, classes: int = 3, separation: float = 0.25,
                    groups: int | None = None, dtype: str = "float32", random_state: int = 0,
                    block: int = 8192, unlabelled: bool = False) -> str:
    """Features = class mean (separation x N(0, 1) per class) + unit noise; labels uniform over `classes`
    (stored as -1 with `unlabelled`: a store to `suggest` from); `groups` > 0 adds a group column (a group also
    shifts its images a little, like a style or a camera)."""
    rng = np.random.default_rng(random_state)
    y = rng.integers(0, classes, n)
    means = rng.normal(size=(classes, dim)) * separation
    g = rng.integers(0, groups, n) if groups else None
    shifts = rng.normal(size=(groups, dim)) * separation * 0.5 if groups else None

    def blocks():
        for i in range(0, n, block):
            j = slice(i, min(n, i + block))
            x = means[y[j]] + rng.normal(size=(j.stop - i, dim))
            if g is not None:
                x += shifts[g[j]]
            yield x.astype(np.float32)

    sha = [hashlib.sha256(f"{random_state}:{i}".encode()).hexdigest() for i in range(n)]
    fp = {"backbone": "synthetic", "weights_sha256": "0" * 64, "preprocess": {}, "dim": dim}
    content = StoreContent(dtype=dtype, labels=np.full(n, -1) if unlabelled else y,
                           paths=[f"x/{i}.png" for i in range(n)], sha256=sha,
                           groups=[f"g{v}" for v in g] if g is not None else None,
                           class_names=[f"c{i}" for i in range(classes)], fingerprint=fp)
    write_store(path, content, blocks=blocks(), dim=dim)
    return str(path)
