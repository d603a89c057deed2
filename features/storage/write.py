"""Writing a feature store: one writer, whole or not at all (temp + rename), and the check that a store already
holds exactly what would be written (so an unchanged re-run does not rewrite it)."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Iterable

import h5py
import numpy as np

from features.errors import UserError
from features.storage.atomic import atomic_file
from features.storage.store import SCHEMA_VERSION, STR, meta_digest, records
from features.text import safe_text


@dataclass
class StoreContent:
    """Everything a store holds but its feature rows: what `write_store` writes and `unchanged` compares."""
    dtype: str  # of the features: float32 | float16
    labels: np.ndarray  # (N,) int64, -1 = unlabelled
    paths: list[str]  # (N,) relative to `root` when inside it
    sha256: list[str]  # (N,) hex of the image bytes
    groups: list[str | None] | None  # (N,) a manifest's group column, or None
    class_names: list[str]
    fingerprint: dict  # backbone, weights hash, preprocessing (and face settings)
    root: str = ""  # the image folder
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    conflicts: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    attrs: dict = field(default_factory=dict)  # extra HDF5 attributes (a shard's index, the weights path)
    face_index: np.ndarray | None = None  # (N,) face mode only
    face_boxes: np.ndarray | None = None  # (N, 4) face mode only
    noface: list[str] = field(default_factory=list)  # face mode: sha256 of images where no face was found

    def digest(self, dim: int) -> str:
        """meta_sha256 of this content with features of `dim` columns (the store's attribute)."""
        return meta_digest(np.asarray(self.labels, np.int64), [safe_text(p) for p in self.paths], list(self.sha256),
                           self.stored_groups(), self.class_names, {**self.fingerprint, "dim": dim},
                           self.face_index, self.face_boxes)

    def stored_groups(self) -> list[str] | None:
        g = self.groups
        return [v or "" for v in g] if g is not None and any(v is not None for v in g) else None


def unchanged(out: str | os.PathLike, c: StoreContent) -> bool:
    """Does the complete store at `out` already hold what write_store would write from `c` and its own feature
    rows? Then extract leaves it alone: same bytes, same mtime, nothing for DVC to re-hash."""
    try:
        with h5py.File(out, "r") as f:
            ds = f["features"]
            same = (int(f.attrs.get("complete", 0)) == 1 and int(f.attrs.get("schema_version", 0)) == SCHEMA_VERSION
                    and ds.dtype == np.dtype(c.dtype) and ds.shape[0] == len(c.paths)
                    and f.attrs.get("meta_sha256") == c.digest(ds.shape[1])
                    and json.loads(f.attrs["fingerprint"]) == {**c.fingerprint, "dim": ds.shape[1]}
                    and str(f.attrs.get("root", "")) == _rel_root(c.root, out)
                    and records(f, "skipped") == [(safe_text(p), safe_text(r)) for p, r in c.skipped]
                    and records(f, "conflict") == [(safe_text(p), safe_text(r)) for p, r in c.conflicts]
                    and all(k in f.attrs and f.attrs[k] == v for k, v in c.attrs.items())
                    and ("shard" in f.attrs) == ("shard" in c.attrs))
            if same:
                same = [s.decode() for s in f["noface_sha256"][:]] == list(c.noface) if "noface_sha256" in f \
                    else not c.noface
            return bool(same)
    except (OSError, KeyError, ValueError, TypeError):
        return False


def write_store(out: str | os.PathLike, c: StoreContent, *, blocks: Iterable[np.ndarray], dim: int) -> str:
    """The one writer of the schema. `blocks` yields feature rows (b, D) in row order, so memory stays O(block);
    the file is built under a temp name and renamed into place when complete. Returns its meta_sha256."""
    n = len(c.paths)
    labels, paths, grp = np.asarray(c.labels, dtype=np.int64), [safe_text(p) for p in c.paths], c.stored_groups()
    dtype, face_index, face_boxes, noface = c.dtype, c.face_index, c.face_boxes, c.noface
    chunk_rows = max(1, min(n, (1 << 20) // (max(dim, 1) * 4)))
    # no object times in the file (track_times): the same rows give the same bytes
    with atomic_file(out) as tmp, h5py.File(tmp, "w") as f:
        ck = dict(fletcher32=True, chunks=True, track_times=False) if n else dict(track_times=False)
        feats = f.create_dataset("features", shape=(n, dim), dtype=dtype, fletcher32=bool(n),
                                 chunks=(chunk_rows, dim) if n else None, track_times=False)
        f.create_dataset("labels", data=labels, **ck)
        f.create_dataset("paths", data=paths, dtype=STR, track_times=False)
        f.create_dataset("sha256", data=np.array(c.sha256, dtype="S64"), **ck)
        if grp is not None:
            f.create_dataset("groups", data=grp, dtype=STR, track_times=False)
        if face_index is not None:
            f.create_dataset("face_index", data=np.asarray(face_index, np.int32).reshape(n), **ck)
            f.create_dataset("face_boxes", data=np.asarray(face_boxes, np.int32).reshape(n, 4), **ck)
        if noface:
            f.create_dataset("noface_sha256", data=np.array(list(noface), dtype="S64"), fletcher32=True, chunks=True,
                             track_times=False)
        for name, recs in (("skipped", c.skipped), ("conflict", c.conflicts)):
            f.create_dataset(f"{name}_paths", data=[safe_text(p) for p, _ in recs], dtype=STR, track_times=False)
            f.create_dataset(f"{name}_reasons", data=[safe_text(r) for _, r in recs], dtype=STR,
                             track_times=False)  # a reason may quote a path
        i0 = 0
        for x in blocks:  # (b, D)
            if not np.isfinite(x).all():
                raise UserError(f"{out}: non-finite features from the backbone; the store was not written")
            feats[i0:i0 + len(x)] = x
            i0 += len(x)
        if i0 != n:
            raise RuntimeError(f"write_store: {i0} feature rows for {n} paths")
        fingerprint = {**c.fingerprint, "dim": dim}
        for k, v in c.attrs.items():
            f.attrs[k] = v
        digest = c.digest(dim)
        f.attrs.update({"class_names": json.dumps(c.class_names), "fingerprint": json.dumps(fingerprint),
                        "backbone": str(fingerprint.get("backbone", "")), "dim": dim, "root": _rel_root(c.root, out),
                        "weights_sha256": str(fingerprint.get("weights_sha256", "")),
                        "preprocess": json.dumps(fingerprint.get("preprocess", {}), sort_keys=True),
                        "meta_sha256": digest, "schema_version": SCHEMA_VERSION})
        f.attrs["complete"] = 1  # last: a store without it is never read
    return digest


def _rel_root(root: str, store: str | os.PathLike) -> str:
    """The image root as the store records it: relative to the store's folder (the same in every checkout of a
    project), absolute only where no relative path exists (another drive)."""
    if not root:
        return ""
    try:
        return os.path.relpath(root, os.path.dirname(os.path.abspath(store)))
    except ValueError:
        return root
