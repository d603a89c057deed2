"""Per-source normalisation at training: each training group (a manifest group: an emoji style, a camera) mapped
onto the training statistics before the head is fitted, as each new source is mapped at prediction
(heads/adapt.py). Numpy only.

Domain-specific batch normalisation (DSBN, Chang et al. 2019) keeps one set of normalisation statistics per
domain, so that the shared weights learn from features with each domain's style taken out. Here the statistics
are those of the adaptation: each group's affine Shift onto the training Reference, for the group's true class
mix (its labels; a group that holds mostly one class is not pulled onto the average of all classes). The head
then learns from what adapted sources look like at prediction, instead of from a pool of styles it never sees
again. Leave-one-family-out on shifts made from the emoji (benchmarks/shift_families.py) and leave-one-style-out
(benchmarks/loso.py) measure it in docs/evaluation.md.

    view = fit_alignment(rows, train)   two passes over the training rows: each group's moments, then the
                                        statistics of the aligned rows (what a new source is adapted to)
    view.rows                           AlignedRows: each group mapped as it is read; .shifts per group
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from pipeline.heads.adapt import MIN_IMAGES, Shift, fit_reference, shift_for
from pipeline.heads.common import labelled_blocks
from pipeline.heads.head import Reference


class AlignedRows:
    """Store rows (pipeline/data/rows.py) with the rows of each group in `shifts` mapped by its Shift as they are
    read (other rows as stored): the part of the Rows interface a fit reads. Nothing is copied up front."""

    def __init__(self, rows, shifts: dict[str, Shift]):
        self.rows, self.shifts = rows, shifts
        self.labels, self.class_names, self.groups, self.dim = rows.labels, rows.class_names, rows.groups, rows.dim
        names = np.asarray(rows.groups, dtype=str)
        self.members = {g: names == g for g in shifts}  # (N,) bool per mapped group

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def in_memory(self) -> bool:
        return self.rows.in_memory

    def _map(self, index: np.ndarray, x: np.ndarray) -> np.ndarray:
        """x (r, D): a copy of the rows index (r,); each group's rows mapped in place."""
        for g, shift in self.shifts.items():
            at = self.members[g][index]  # (r,)
            if at.any():
                x[at] = shift.apply(x[at])
        return x

    def take(self, mask: np.ndarray) -> np.ndarray:
        return self._map(np.flatnonzero(mask), self.rows.take(mask))

    def features_of(self, mask: np.ndarray) -> "np.ndarray | Sequence[np.ndarray]":
        return self.take(mask) if self.in_memory else _MappedBlocks(self, self.rows.features_of(mask), mask)

    def blocks(self, mask: np.ndarray | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """(start, mapped copy of rows [start, start + r)) in row order, at most block_rows rows each."""
        step = self.rows.block_rows
        for start, x in self.rows.blocks(mask):
            for i in range(0, len(x), step):
                part = np.array(x[i:i + step], np.float32)  # (r, D) a copy
                yield start + i, self._map(np.arange(start + i, start + i + len(part)), part)


class _MappedBlocks(Sequence):
    """A streamed fit's blocks (RowBlocks), each mapped by AlignedRows as it is read."""

    def __init__(self, aligned: AlignedRows, blocks, mask: np.ndarray):
        self.aligned, self.raw, self.mask, self.sizes = aligned, blocks, mask, blocks.sizes

    def __len__(self) -> int:
        return len(self.raw)

    def __getitem__(self, i: int) -> np.ndarray:
        s, step = self.raw.starts[i], self.aligned.rows.block_rows
        return self.aligned._map(s + np.flatnonzero(self.mask[s:s + step]), self.raw[i])


@dataclass(frozen=True)
class TrainingView:
    """What a head on some training rows is fitted on (the rows as stored, or AlignedRows) and the Reference
    statistics of those rows, which a new source is adapted to."""
    rows: object
    reference: Reference


def fit_alignment(rows, train: np.ndarray, reference: Reference) -> TrainingView:
    """Each group's affine Shift onto `reference` (the statistics of the training rows where `train` is True, as
    stored) for its own moments and true class mix; a group of fewer than MIN_IMAGES training rows stays as it
    is, as such a source does at prediction. One pass for the groups' moments (float64 sums, (G, D)), one for
    the statistics of the mapped rows."""
    names = np.asarray(rows.groups, dtype=str)
    C = len(rows.class_names)
    keys, which = np.unique(names[train], return_inverse=True)
    n = np.zeros(len(keys))
    counts = np.zeros((len(keys), C))
    s1 = s2 = None
    index = np.full(len(rows), -1)
    index[train] = which  # row -> its group's place in keys, -1 outside `train`
    for start, x in rows.blocks(train):
        g = index[start:start + len(x)]
        keep = g >= 0
        x, g, y = np.asarray(x[keep], np.float32), g[keep], rows.labels[start:start + len(x)][keep]
        if s1 is None:
            s1, s2 = np.zeros((len(keys), x.shape[1])), np.zeros((len(keys), x.shape[1]))
        for k in np.unique(g):
            xk = x[g == k]  # (r_k, D)
            s1[k] += xk.sum(0, dtype=np.float64)
            s2[k] += np.einsum("ij,ij->j", xk, xk, dtype=np.float64)
        n += np.bincount(g, minlength=len(keys))
        np.add.at(counts, (g, y), 1)
    shifts = {}
    for k, name in enumerate(keys):
        if n[k] >= MIN_IMAGES:
            mean = s1[k] / n[k]
            shifts[str(name)] = shift_for("affine", int(n[k]), mean, np.maximum(s2[k] / n[k] - mean ** 2, 0.0),
                                          reference, counts[k] / n[k])
    aligned = AlignedRows(rows, shifts)
    return TrainingView(aligned, fit_reference(labelled_blocks(aligned, train), C))
