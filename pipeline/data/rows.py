"""Stores -> rows: labels and metadata in memory, features either in memory (one block) or read from the
HDF5 file in chunk-aligned blocks when they exceed the memory budget. Both give the same interface, so CV,
the fit loop and evaluation have one code path for every store size.

Several stores (one per backbone) are joined by image content and their features concatenated, block
after block, in the order given (in memory only). Face-mode stores (one row per face crop) join on
(image, face index) with each other and broadcast a whole-image store's row to every face of that image.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import h5py
import numpy as np

from features.errors import UserError
from features.storage.store import Store, describe_mismatch, other_imgsent, read_store
from pipeline.data.memory import IN_MEMORY_COPIES, check_score_memory, memory_budget


@dataclass
class Rows:
    labels: np.ndarray  # (N,) int64, -1 = unlabelled
    paths: list[str]
    sha256: list[str]
    groups: list[str] | None
    class_names: list[str]
    fingerprints: list[dict]  # one per feature block, in column order
    weights_paths: list[str | None]  # local backbone weights per block (None: wheel or hub)
    root: str
    stores: list[str]  # absolute, resolved
    dim: int
    features: np.ndarray | None = None  # (N, D) float32 when in memory, else None: read with blocks()
    block_rows: int = 8192
    face_index: np.ndarray | None = None  # (N,) face mode: which face of its image each row is
    face_boxes: np.ndarray | None = None  # (N, 4) face mode: crop x, y, w, h
    file: h5py.File | None = None  # streamed: the store, held open from the first read, so that an extract
    # replacing it meanwhile (temp + rename) cannot change what later passes read: they see one snapshot

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def in_memory(self) -> bool:
        return self.features is not None

    def blocks(self, mask: np.ndarray | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """(start, features (r, D) float32) in row order: every block, or (streamed) only the blocks that hold a
        row of `mask`."""
        if self.features is not None:
            yield 0, self.features
            return
        for start in range(0, len(self), self.block_rows):
            if mask is None or mask[start:start + self.block_rows].any():
                yield start, self.read_block(start)

    def read_block(self, start: int) -> np.ndarray:
        """Streamed: rows [start, start + block_rows) of the store held open, (r, D) float32, checksums verified."""
        path = self.stores[0]
        try:
            x = self.file["features"][start:start + self.block_rows].astype(np.float32)
        except OSError as e:
            raise UserError(f"{path}: damaged store ({str(e).splitlines()[0][:80]}); "
                            "re-run imgsent extract to re-embed it") from None
        if not np.isfinite(x).all():
            raise UserError(f"{path}: damaged store (non-finite features near row {start}); "
                            "re-run imgsent extract to re-embed it")
        return x

    def take(self, mask: np.ndarray) -> np.ndarray:
        """Features of the rows where `mask` is True, in row order: (sum(mask), D) float32, a copy."""
        if self.features is not None:
            return self.features[mask]
        return np.concatenate([*RowBlocks(self, mask)] or [np.zeros((0, self.dim), np.float32)])

    def face_columns(self, mask: np.ndarray) -> dict[str, list]:
        """Face mode: the extra CSV columns face,x,y,w,h of the rows in `mask` (none for whole-image rows)."""
        if self.face_index is None:
            return {}
        b = self.face_boxes[mask]
        return {"face": self.face_index[mask].tolist(), **{k: b[:, j].tolist() for j, k in enumerate("xywh")}}

    def features_of(self, mask: np.ndarray) -> "np.ndarray | RowBlocks":
        """A head's input X for the rows in `mask`: a copy (sum(mask), D) in memory, else blocks read on access."""
        return self.features[mask] if self.features is not None else RowBlocks(self, mask)


class RowBlocks(Sequence):
    """The features of a streamed store's rows in `mask`, as blocks in row order, each read from the store when
    accessed: block i (r_i, D) float32. len() and the block sizes need no read."""

    def __init__(self, rows: Rows, mask: np.ndarray):
        step = rows.block_rows
        self.rows, self.mask = rows, mask
        self.starts = [s for s in range(0, len(rows), step) if mask[s:s + step].any()]
        self.sizes = [int(mask[s:s + step].sum()) for s in self.starts]

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> np.ndarray:
        s = self.starts[i]
        return self.rows.read_block(s)[self.mask[s:s + self.rows.block_rows]]


def means_by_owner(owner: np.ndarray, n: int, *values: np.ndarray) -> list[np.ndarray]:
    """Each of `values` (R, K) averaged over the rows of each owner: owner (R,) in [0, n) -> (n, K) float64,
    NaN for an owner without rows (an image that failed)."""
    count = np.bincount(owner, minlength=n)[:, None]  # (n, 1)
    means = []
    for v in values:
        total = np.zeros((n, v.shape[1]))
        np.add.at(total, owner, v)
        with np.errstate(invalid="ignore", divide="ignore"):
            means.append(total / count)
    return means


def image_means(paths: list[str], *values: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """Face mode (`all`): rows -> images. The index of each image's first row (I,), and each of `values`
    (R, K) averaged over the rows of its image -> (I, K) float64; images in path order."""
    _, first, owner = np.unique(np.asarray(paths, dtype=str), return_index=True, return_inverse=True)
    return first, means_by_owner(owner, len(first), *values)


def _feature_bytes(path: str) -> int:
    try:
        with h5py.File(path, "r") as f:
            n, d = f["features"].shape
        return n * d * 4  # float32 in memory, whatever the stored dtype
    except (OSError, KeyError, ValueError):
        return 0  # read_store names the problem


def _hold(path: str) -> h5py.File | None:
    try:
        return h5py.File(path, "r")
    except OSError:
        return None  # read_store names the problem


def _inode(f: h5py.File) -> int:
    return os.fstat(f.id.get_vfd_handle()).st_ino


def _path_inode(path: str) -> int:
    try:
        return os.stat(path).st_ino
    except OSError:
        return -1


def open_rows(stores: list[str], *, memory_budget_mb: int = 0, intersect: bool = False,
              expect: list[dict] | None = None) -> Rows:
    """Read and join stores. `expect`: fingerprints a trained head needs, in order; a mismatch is refused.
    Features beyond the memory budget stay on disk and are read block by block."""
    if isinstance(stores, (str, Path)):  # the Python API: 'a.h5' would be read as the stores 'a', '.', 'h', '5'
        raise UserError(f"stores={str(stores)!r}: expected a list of store paths; pass [{str(stores)!r}]")
    if not stores:
        raise UserError("no store given; pass at least one STORE.h5 made by imgsent extract")
    budget = memory_budget(memory_budget_mb)
    # In memory when the features fit the budget twice: the rows, and the one copy a fit standardises in place.
    big = len(stores) == 1 and IN_MEMORY_COPIES * _feature_bytes(stores[0]) > budget
    if len(stores) > 1 and IN_MEMORY_COPIES * sum(_feature_bytes(s) for s in stores) > budget:
        raise UserError(f"{stores[0]}: fusing stores larger than the memory budget ({budget >> 20} MiB) is not "
                        "supported; raise cv.memory_budget_mb or use one store")
    held = _hold(stores[0]) if big else None
    parts: list[Store] = [read_store(s, features=not big) for s in stores]
    check_score_memory(len(parts[0]), len(parts[0].class_names), stores[0])
    if held is not None and _inode(held) != _path_inode(stores[0]):
        raise UserError(f"{stores[0]}: replaced while being opened (an extract writing it?); re-run when it has "
                        "finished")
    for s in parts:
        if s.schema_version < 2:
            raise UserError(f"{s.path}: made by an older imgsent (store schema 1, no checksums); re-run imgsent "
                            "extract on it to upgrade (its features are reused)")
    if expect is not None:
        if len(expect) != len(parts):
            raise UserError(f"the model was trained on {len(expect)} store(s) ({', '.join(e['backbone'] for e in expect)}), "
                            f"got {len(parts)}; pass one store per backbone, in that order")
        for s, fp in zip(parts, expect):
            if s.fingerprint != fp:
                fix = ("re-extract the model's training images with the same imgsent as this store and re-run "
                       "train-head" if other_imgsent(fp, s.fingerprint) else
                       f"extract it with --backbone {fp['backbone']} and the same weights")
                raise UserError(f"{s.path}: features do not match the model "
                                f"({describe_mismatch(fp, s.fingerprint, ('the model', 'this store'))}); {fix}")
    base = parts[0]
    for s in parts[1:]:
        if s.class_names != base.class_names:
            raise UserError(f"{s.path}: classes {s.class_names} differ from {base.path}'s {base.class_names}; "
                            "extract both from the same images")
    for i, s in enumerate(parts if expect is None else []):  # (a model's stores were matched to its fingerprints)
        same = next((t for t in parts[:i] if t.fingerprint == s.fingerprint), None)
        if same is not None:
            what = ("given twice" if Path(same.path).resolve() == Path(s.path).resolve() else
                    f"the same features as {same.path} (backbone {s.fingerprint['backbone']}, the same weights and "
                    "preprocessing)")
            raise UserError(f"{s.path}: {what}: fusing them adds nothing; pass each backbone's store once")
    absolute = [str(Path(s).resolve()) for s in stores]
    common = dict(class_names=base.class_names, fingerprints=[s.fingerprint for s in parts],
                  weights_paths=[s.weights_path for s in parts], root=base.root, stores=absolute)
    if len(parts) == 1:
        block = max(256, budget // (16 * 4 * max(base.dim, 1)))  # a few blocks in flight stay within budget
        return Rows(base.labels, base.paths, base.sha256, base.groups, dim=base.dim, features=base.features,
                    block_rows=block, face_index=base.face_index, face_boxes=base.face_boxes, file=held, **common)
    faced = [s for s in parts if s.face_index is not None]
    for s in faced[1:]:
        if s.fingerprint["faces"] != faced[0].fingerprint["faces"]:
            raise UserError(f"{s.path}: its faces were cut with other settings than {faced[0].path}'s; re-extract "
                            "both with the same --faces / --faces-fallback and OpenCV")
    li = next((j for j, s in enumerate(parts) if s.face_index is not None), 0)
    lead = parts[li]  # the rows: every face of the first face-mode store, else every image
    # Join on (sha256, path[, face]): the same picture under two paths is two rows in every store.
    keys = [dict((_key(s, i), i) for i in range(len(s))) for s in parts]
    images = [{k[:2] for k in ks} for ks in keys]
    shared_images = set.intersection(*images)
    counts = ", ".join(f"{s.path}: {len(im)}" for s, im in zip(parts, images))
    if not intersect and any(len(im) != len(shared_images) for im in images):
        hint = (" (face mode skips images without a face: use --faces-fallback whole, or --intersect)"
                if faced and len(faced) < len(parts) else "")
        raise UserError(f"stores hold different images ({counts}; {len(shared_images)} shared){hint}; "
                        "re-extract from the same images, or pass --intersect to use only the shared ones")
    if not shared_images:  # --intersect: it said 'no labelled images', naming the first store
        raise UserError(f"stores share no image ({counts}): fusion joins each image's features from every store; "
                        "extract the same images (folder or manifest) with each backbone")

    def at(s: Store, k: tuple) -> tuple:  # a lead row's key in store s: whole-image stores have no face index
        return k if s.face_index is not None else k[:2]

    lead_keys = [_key(lead, i) for i in range(len(lead))]
    order = [i for i, k in enumerate(lead_keys)
             if k[:2] in shared_images and all(at(s, k) in ks for s, ks in zip(parts, keys))]
    cols = [s.features[[ks[at(s, lead_keys[i])] for i in order]] for s, ks in zip(parts, keys)]
    return Rows(lead.labels[order], [lead.paths[i] for i in order], [lead.sha256[i] for i in order],
                [lead.groups[i] for i in order] if lead.groups else None, dim=sum(s.dim for s in parts),
                features=np.concatenate(cols, axis=1),
                face_index=lead.face_index[order] if faced else None,
                face_boxes=lead.face_boxes[order] if faced else None, **common)


def _key(s: Store, i: int) -> tuple:
    """A row's identity for joining: (sha256, path), plus the face index in a face-mode store."""
    return (s.sha256[i], s.paths[i]) if s.face_index is None else (s.sha256[i], s.paths[i], int(s.face_index[i]))

