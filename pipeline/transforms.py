"""The adaptation transforms, one registry: how a source's per-dimension moments map onto the training statistics.
Params validation, CV's order of preference, the init template and heads/adapt.py (which fits and applies them)
all read REGISTRY, so adding a transform is one entry here plus its test. Numpy only.

A transform gets a source of n images with per-dimension mean and variance, and the centre and variance the
training rows would have for the source's estimated class mix (heads/adapt.py), all (D,), and returns
(ratio, offset), (D,) each: the head sees z = (x - offset) / ratio. PRIOR_IMAGES shrinks both toward no change,
so a small source moves little and one image not at all.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

PRIOR_IMAGES = 8  # the training statistics count as this many images (the prior strength of Schneider et al. 2020)
MAX_RATIO = 10.0  # never amplify or damp a dimension by more than this
NONE = "none"  # each image on its own, as the exported model: what every other transform is compared with

Shift = Callable[[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def _ratio(n: int, var: np.ndarray, ref_var: np.ndarray) -> np.ndarray:
    """(D,) the source's spread over the training spread, shrunk toward 1, within [1/MAX_RATIO, MAX_RATIO]."""
    return np.clip(np.sqrt((n * var + PRIOR_IMAGES * ref_var) / ((n + PRIOR_IMAGES) * ref_var)), 1 / MAX_RATIO,
                   MAX_RATIO)


def _scale(n, mean, var, centre, ref_var):
    return _ratio(n, var, ref_var), np.zeros_like(mean)


def _affine(n, mean, var, centre, ref_var):
    ratio = _ratio(n, var, ref_var)
    return ratio, n / (n + PRIOR_IMAGES) * (mean - ratio * centre)


@dataclass(frozen=True)
class Transform:
    name: str
    help: str  # a few words for params.yaml
    shift: Shift | None  # None: the source is not adapted


# In order of preference when CV cannot tell them apart: the order in which they gained most on emoji styles never
# seen in training (benchmarks/loso.py).
REGISTRY = {t.name: t for t in (
    Transform("affine", "each dimension scaled and shifted", _affine),
    Transform("scale", "each dimension scaled", _scale),
    Transform(NONE, "not adapted: each image on its own", None),
)}


def adapts(name: str) -> bool:
    """Whether the transform `name` adapts a source (every one but none)."""
    return transform(name).shift is not None


def transform(name: str) -> Transform:
    """The registered transform `name`; an unknown name is refused, naming those there are."""
    if name not in REGISTRY:
        raise ValueError(f"unknown adaptation transform {name!r}: one of {', '.join(REGISTRY)}")
    return REGISTRY[name]
