"""Adapting one source's features (a new emoji style, camera, folder) to the training statistics before the head:
label-free, aware of the source's own class mix, shrunk toward the training statistics. Numpy only.

A new source mostly moves each feature dimension by a scale and an offset. AdaBN (Li et al. 2016) re-estimates
normalisation statistics on the target domain; CORAL (Sun et al. 2016) aligns second-order statistics. Both
compare the target with the source *as a whole*, and so read a change of class mix as a change of style:
test-time batch statistics fail on class-skewed batches (DELTA, Zhao et al. 2023; Vianna et al. 2024; Tent,
Wang et al. 2021, adapts the same statistics). Here a source is compared with what the training images of its
*estimated* class mix would give:

    centre(pi) = pi @ ref.mean                       (D,)  the training mean of a batch with class mix pi (C,)
    var(pi)    = pi @ ref.sq - centre(pi)**2         (D,)  ...and its variance
    ratio      = sqrt((n var_b + N0 var(pi)) / ((n + N0) var(pi)))     per dimension, in [1/10, 10]
    offset     = n / (n + N0) * (mean_b - ratio * centre(pi))           ('affine'; 0 for 'scale': pipeline/transforms.py)
    z          = (x - offset) / ratio                                    what the head sees

pi starts as the share of the batch's images the head assigns to each class (classify and count, Forman 2008),
and is re-estimated CLASS_MIX_STEPS times as that share on the adapted batch (fewer where a step leaves it as it
was: the steps left would too). The head's mean probability instead
(probabilistic classify and count, Bella et al. 2010) is pulled toward an even mix wherever the head is unsure,
which a new source makes it: on a weak head (the FER expert alone) a batch of two classes was read as a mix of
all, centred on the wrong training statistics, and lost 0.03 accuracy to no adaptation; counting, at most 0.005
(docs/benchmarks.md). Saerens et al. 2002's re-weighting needs calibrated probabilities and measured worse still.
Starting from the training class mix instead, a skewed batch of a known source was dragged toward the training
centre and misread (tests/test_adapt.py).
N0 = PRIOR_IMAGES: the training statistics count as that many images (the prior strength of Schneider et al.
2020), so a small batch moves little and one image not at all. Sources of fewer than MIN_IMAGES are not
adapted. Measured on 5 emoji styles (benchmarks/loso.py, docs/evaluation.md).

Deterministic and independent of row order: an array's rows are visited in an order set by their values.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from pipeline.heads.head import Head, Reference
from pipeline.transforms import PRIOR_IMAGES, REGISTRY, adapts, transform as registered

TRANSFORMS = tuple(REGISTRY)  # pipeline/transforms.py: the transforms, in order of preference
MIN_IMAGES = 5
CLASS_MIX_STEPS = 3
CHUNK = 4096  # rows per step over an in-memory source
# model.json records the recipe; a model adapted by another recipe is refused
RECIPE = {"prior_images": PRIOR_IMAGES, "min_images": MIN_IMAGES, "class_mix_steps": CLASS_MIX_STEPS,
          "class_mix": "counts"}

Chunks = Callable[[], Iterator[np.ndarray]]  # a source's raw features (r, D), the same rows in the same order each call


def class_sums(pairs, n_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per class: the sum and the sum of squares (C, D) float64 and the count (C,) of rows given as (raw features
    (r, D), labels (r,)) pairs. One pass: each pair's rows class by class (a stable sort of the labels), summed in
    float64 from the float32 rows without a float64 copy of them (that copy, argsort and reduceat cost 2.5 s a
    fold on 28,700 x 1280; this 0.13 s)."""
    sums = sqs = None
    counts = np.zeros(n_classes)
    for x, y in pairs:
        if sums is None:
            sums, sqs = np.zeros((n_classes, x.shape[1])), np.zeros((n_classes, x.shape[1]))
        order = np.argsort(y, kind="stable")
        bounds = np.searchsorted(y[order], np.arange(n_classes + 1))  # class c: order[bounds[c]:bounds[c + 1]]
        for c in np.flatnonzero(np.diff(bounds)):
            xc = np.asarray(x[order[bounds[c]:bounds[c + 1]]], np.float32)  # (r_c, D)
            sums[c] += xc.sum(0, dtype=np.float64)
            sqs[c] += np.einsum("ij,ij->j", xc, xc, dtype=np.float64)
        counts += np.bincount(y, minlength=n_classes)
    return sums, sqs, counts


def reference_from(sums: np.ndarray, sqs: np.ndarray, counts: np.ndarray) -> Reference:
    """The Reference of rows with these class_sums."""
    n = np.maximum(counts, 1)[:, None]
    return Reference((sums / n).astype(np.float32), (sqs / n).astype(np.float32),
                     (counts / counts.sum()).astype(np.float32))


def fit_reference(pairs, n_classes: int) -> Reference:
    """The Reference of training rows given as (raw features (r, D), labels (r,)) pairs, one pass (class_sums)."""
    return reference_from(*class_sums(pairs, n_classes))


@dataclass(frozen=True)
class Shift:
    """How one source's features map onto the training statistics: z = (x - offset) / ratio."""
    transform: str
    n: int  # images in the source
    ratio: np.ndarray  # (D,)
    offset: np.ndarray  # (D,)
    class_mix: np.ndarray  # (C,) the source's estimated class mix

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Raw features (r, D) -> adapted (r, D) float32."""
        return (np.asarray(x, np.float32) - self.offset.astype(np.float32)) / self.ratio.astype(np.float32)

    def adapt(self, head: Head) -> Head:
        """`head` with the shift folded into its standardisation: ((x - offset) / ratio - mean) / scale =
        (x - (offset + ratio mean)) / (ratio scale), so an adapted pass over a source costs what a plain one does."""
        return dataclasses.replace(head, mean=(self.offset + self.ratio * head.mean).astype(np.float32),
                                   scale=(self.ratio * head.scale).astype(np.float32))


def shift_for(transform: str, n: int, mean: np.ndarray, var: np.ndarray, ref: Reference, pi: np.ndarray) -> Shift:
    """The Shift of a source of n images with per-dimension mean and variance (D,) onto ref's statistics for the
    class mix pi (C,): the transform's formulas (pipeline/transforms.py; an unknown name is refused)."""
    ratio, offset = registered(transform).shift(n, mean, var, *ref.moments(pi))  # (D,) each
    return Shift(transform, n, ratio, offset, pi)


def fit_shifts(head: Head, chunks: Chunks, transforms: tuple[str, ...]) -> dict[str, Shift | None]:
    """The Shift of one source under each transform (None: 'none', or fewer than MIN_IMAGES images). Needs
    head.reference."""
    shifts = _fit_shifts(head, chunks, transforms)
    return {t: shifts[t][0] if t in shifts else None for t in transforms}


def shifted_logits(head: Head, chunks: Chunks, transforms: tuple[str, ...]) -> dict[str, tuple[np.ndarray, Shift]]:
    """Per transform that adapts this source: its logits (N, C) under the transform's Shift, in the chunks' row
    order, and the Shift. Where the class-mix steps stopped at a fixed point, their last pass was made under that
    very Shift, so its logits are the answer and are not computed again (one pass of three, most often)."""
    return {t: (logits if logits is not None else np.concatenate([shift.adapt(head).logits(x) for x in chunks()]),
                shift) for t, (shift, logits) in _fit_shifts(head, chunks, transforms).items()}


def _fit_shifts(head: Head, chunks: Chunks, transforms: tuple[str, ...]
                ) -> dict[str, tuple[Shift, np.ndarray | None]]:
    """fit_shifts' Shifts, of the transforms that adapt the source only, each with the source's logits under it
    when the class-mix steps computed them (settled). The transforms share the passes they have in common, one
    for the source's moments and one for the class mix as it is; then each makes one pass per class-mix step."""
    adapting = [t for t in transforms if adapts(t)]
    if not adapting:
        return {}
    n, s1, s2 = 0, 0.0, 0.0
    for x in chunks():  # sums in float64 of the float32 rows, without a float64 copy of them
        x = np.asarray(x, np.float32)
        n, s1, s2 = n + len(x), s1 + x.sum(0, dtype=np.float64), s2 + np.einsum("ij,ij->j", x, x, dtype=np.float64)
    if n < MIN_IMAGES:
        return {}
    if head.reference is None:
        raise ValueError("the head has no reference statistics to adapt to")
    mean = s1 / n
    var = np.maximum(s2 / n - mean ** 2, 0.0)

    def mix(h: Head) -> tuple[np.ndarray, np.ndarray]:  # (C,) the share of the rows h assigns to each class, and
        logits = np.concatenate([h.logits(x) for x in chunks()])  # the logits (N, C) that share was counted from
        return np.bincount(logits.argmax(1), minlength=head.n_classes) / n, logits
    as_is = mix(head)[0]
    out = {}
    for t in adapting:
        pi, logits = settled(lambda pi: mix(shift_for(t, n, mean, var, head.reference, pi).adapt(head)), as_is)
        out[t] = (shift_for(t, n, mean, var, head.reference, pi), logits)
    return out


def settled(step: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]], pi: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray | None]:
    """The class mix after CLASS_MIX_STEPS re-estimates (pi, logits) <- step(pi), the logits being those the new
    mix was counted from (under pi's shift); or fewer: a step that leaves pi as it was has reached a fixed point,
    and every step left would give it again. -> (pi, the logits under pi's shift at a fixed point, else None)."""
    for _ in range(CLASS_MIX_STEPS):
        new, logits = step(pi)
        if np.array_equal(new, pi):
            return pi, logits
        pi = new
    return pi, None


def fit_shift(head: Head, chunks: Chunks, transform: str) -> Shift | None:
    """fit_shifts for one transform."""
    return fit_shifts(head, chunks, (transform,))[transform]


def value_order(x: np.ndarray) -> np.ndarray:
    """A permutation of the rows of x (N, D) that depends only on their values: the rows sorted by their float32
    bytes, compared as byte strings (numpy's sort of an unstructured void dtype), so that sums over the rows come
    out the same whatever order the images were given in. Rows that compare equal are equal (a row hash, the
    rule until 2026-12-07, was 20x slower and could collide: docs/benchmarks.md)."""
    rows = np.ascontiguousarray(x, np.float32)
    return np.argsort(rows.view(np.dtype((np.void, 4 * rows.shape[1]))).ravel(), kind="stable")


def _logits(head: Head, x: np.ndarray) -> np.ndarray:
    """head.logits of x (N, D) a CHUNK of rows at a time, in x's order: (N, C)."""
    return np.concatenate([head.logits(x[i:i + CHUNK]) for i in range(0, len(x), CHUNK)] or
                          [np.zeros((0, head.n_classes), np.float32)])


def source_logits_each(head: Head, x: np.ndarray, transforms: tuple[str, ...]
                       ) -> dict[str, tuple[np.ndarray, Shift | None]]:
    """Per transform: uncalibrated logits (N, C) of one source's raw features x (N, D), in x's row order, and the
    Shift applied (None: not adapted, and then the logits are 'none''s, bit for bit). The shifts are fitted over
    the rows in value order (one gathered copy of x), sharing the passes fit_shifts shares."""
    out, plain = {}, None
    if any(adapts(t) for t in transforms):
        order = value_order(x)
        xs = x[order]  # (N, D) in value order
        for t, (logits, shift) in shifted_logits(head, lambda: (xs[i:i + CHUNK] for i in range(0, len(xs), CHUNK)),
                                                 transforms).items():
            out[t] = (np.empty((len(x), head.n_classes), np.float32), shift)
            out[t][0][order] = logits
    for t in transforms:
        if t not in out:  # each image on its own: no statistics, no row order to fix
            plain = _logits(head, x) if plain is None else plain
            out[t] = (plain, None)
    return out


def many_sources_logits_each(head: Head, x: np.ndarray, sizes: np.ndarray, transforms: tuple[str, ...]
                             ) -> dict[str, np.ndarray]:
    """Per transform: uncalibrated logits (R, C) of many small sources at once, each adapted on its own as
    source_logits_each adapts it alone: source s is the next sizes[s] rows of x (R, D), sum(sizes) = R. The same
    formulas, a step at a time for every source; only the rounding differs (each source's sums run in x's row
    order, not value order, and the head's products cover all the rows at once). For CV's stress batches, most
    of 5 or 10 images: one at a time, every product read the head's whole first layer (256 x 1280) for 5 rows.
    Every size at least 1. Memory: x and a few (R, D) float32 copies, one float64; the caller bounds R."""
    x = np.asarray(x, np.float32)
    sizes = np.asarray(sizes)
    starts, src = np.cumsum(sizes) - sizes, np.repeat(np.arange(len(sizes)), sizes)  # (S,), (R,) each row's source
    plain = _logits(head, x)
    out = {t: plain for t in transforms if not adapts(t)}
    adapting = [t for t in transforms if adapts(t)]
    if not adapting:
        return out
    if head.reference is None:
        raise ValueError("the head has no reference statistics to adapt to")
    n = sizes[:, None].astype(np.float64)  # (S, 1)
    mean = np.add.reduceat(x, starts, axis=0, dtype=np.float64) / n  # (S, D)
    var = np.maximum(np.add.reduceat(np.square(x, dtype=np.float64), starts, axis=0) / n - mean ** 2, 0.0)
    small = sizes < MIN_IMAGES  # (S,) not adapted: their rows keep the plain logits

    def mix(logits: np.ndarray) -> np.ndarray:  # (S, C) the share of each source's rows assigned to each class
        counts = np.bincount(src * head.n_classes + logits.argmax(1), minlength=len(sizes) * head.n_classes)
        return counts.reshape(len(sizes), head.n_classes) / n

    def adapted(t: str, pi: np.ndarray) -> np.ndarray:  # (R, C) every source under its Shift for class mix pi
        ratio, offset = registered(t).shift(n, mean, var, *head.reference.moments(pi))  # (S, D) each
        logits = _logits(head, (x - offset.astype(np.float32)[src]) / ratio.astype(np.float32)[src])
        logits[small[src]] = plain[small[src]]
        return logits

    def step(t: str, pi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits = adapted(t, pi)
        return mix(logits), logits
    as_is = mix(plain)
    for t in adapting:
        pi, logits = settled(lambda pi: step(t, pi), as_is)  # (settled: every source at once)
        out[t] = adapted(t, pi) if logits is None else logits
    return out


def source_logits(head: Head, x: np.ndarray, transform: str) -> tuple[np.ndarray, Shift | None]:
    """source_logits_each for one transform."""
    return source_logits_each(head, x, (transform,))[transform]
