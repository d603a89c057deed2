"""The one loop over sources that CV, evaluate and predict share: each source's rows adapted on their own
(heads/adapt.py), and the record of what each source's predictions rest on (Adapted: a CSV word, a summary line)."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from features.text import plural
from pipeline.heads.adapt import MIN_IMAGES, Shift, shifted_logits, source_logits_each
from pipeline.heads.head import Head
from pipeline.transforms import adapts


@dataclass(frozen=True)
class Adapted:
    """What one source's predictions rest on: the transform it was adapted by, or that it was not, and whether
    only its size stopped it (an adapting transform, fewer than MIN_IMAGES images)."""
    transform: str | None  # None: not adapted
    images: int
    too_small: bool = False

    @property
    def too_small_by(self) -> str:
        return f"{plural(self.images, 'image')} < {MIN_IMAGES}" if self.too_small else ""

    @property
    def word(self) -> str:
        """For a CSV column or JSON: 'affine' / 'no (3 images < 5)' / 'no'."""
        if self.transform is not None:
            return self.transform
        return f"no ({self.too_small_by})" if self.too_small else "no"


def describe(shift: Shift | None, n: int, transform: str) -> Adapted:
    """What a source of n images predicted under `transform` rests on, given the Shift fitted (None: not adapted)."""
    if shift is not None:
        return Adapted(shift.transform, n)
    return Adapted(None, n, too_small=adapts(transform) and n < MIN_IMAGES)


def sources_note(per_source: dict[str, Adapted]) -> str:
    """One line from the sources' Adapted records: '2 sources adapted (affine); 1 source too small to adapt
    (3 images < 5)', or 'not adapted (the model's transform is none)'."""
    if not per_source:  # predict where every image failed: no source at all, whatever the transform
        return "nothing to adapt (no image could be read)"
    adapted = Counter(a.transform for a in per_source.values() if a.transform is not None)
    small = [a.too_small_by for a in per_source.values() if a.too_small]
    parts = [f"{plural(k, 'source')} adapted ({t})" for t, k in sorted(adapted.items())]
    if small:
        parts.append(f"{plural(len(small), 'source')} too small to adapt ({small[0]}{', ...' if len(small) > 1 else ''})")
    return "; ".join(parts) or "not adapted (the model's transform is none)"


def per_source(head: Head, sources: np.ndarray | None, n: int, transforms: tuple[str, ...], each
               ) -> dict[str, tuple[np.ndarray, list[str], dict[str, Adapted]]]:
    """The one loop over sources that CV, evaluate and predict share. Per transform: uncalibrated logits (n, C) of
    n rows, each source adapted on its own; sources: a name per row (n,), or None (all rows one source, named '');
    what each row's prediction rests on (Adapted.word), and per source its Adapted record. each(pos):
    source_logits_each of the rows at positions pos (one source's, in order)."""
    names, which = np.unique(np.asarray(sources if sources is not None else [""] * n, dtype=str),
                             return_inverse=True)
    out = {t: (np.empty((n, head.n_classes), np.float32), [""] * n, {}) for t in transforms}
    for k, name in enumerate(names):
        pos = np.flatnonzero(which == k)
        for t, (logits, shift) in each(pos).items():
            out[t][0][pos] = logits
            record = out[t][2][str(name)] = describe(shift, len(pos), t)
            for p in pos:
                out[t][1][p] = record.word
    return out


def rows_logits_each(head: Head, rows, mask: np.ndarray, sources: np.ndarray | None, transforms: tuple[str, ...]
                     ) -> dict[str, tuple[np.ndarray, list[str], dict[str, Adapted]]]:
    """per_source over the store rows (pipeline/data/rows.py) where `mask` is True, in row order (sources: a name
    per store row (N,), or None). A streamed store's source is read in blocks, in store order."""
    idx = np.flatnonzero(mask)

    def each(pos: np.ndarray):
        if rows.in_memory:
            return source_logits_each(head, rows.features[idx[pos]], transforms)
        m = np.zeros(len(rows), bool)
        m[idx[pos]] = True

        def chunks():
            return (x[m[s:s + len(x)]] for s, x in rows.blocks(m))
        out = shifted_logits(head, chunks, transforms)
        if len(out) < len(transforms):  # the others: not adapted, each image on its own
            plain = np.concatenate([head.logits(x) for x in chunks()])
            out |= {t: (plain, None) for t in transforms if t not in out}
        return out
    return per_source(head, None if sources is None else np.asarray(sources, dtype=str)[idx], len(idx), transforms,
                      each)


def rows_logits(head: Head, rows, mask: np.ndarray, sources: np.ndarray | None, transform: str
                ) -> tuple[np.ndarray, list[str], dict[str, Adapted]]:
    """rows_logits_each for one transform."""
    return rows_logits_each(head, rows, mask, sources, (transform,))[transform]
