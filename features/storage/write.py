"""Writing a feature store: one writer, whole or not at all (temp + rename), and the check that a store already
holds exactly what would be written (so an unchanged re-run does not rewrite it)."""
from __future__ import annotations

import json
import os
from typing import Iterable

import h5py
import numpy as np

from features.errors import UserError
from features.storage.atomic import atomic_file
from features.storage.store import SCHEMA_VERSION, STR, meta_digest, records
from features.text import safe_text


def unchanged(out: str | os.PathLike, *, dtype: str, labels: np.ndarray, paths: list[str], sha256: list[str],
              groups: list[str | None] | None, class_names: list[str], fingerprint: dict, root: str = "",
              skipped: list[tuple[str, str]] = (), conflicts: list[tuple[str, str]] = (), attrs: dict | None = None,
              face_index: np.ndarray | None = None, face_boxes: np.ndarray | None = None,
              noface: list[str] = ()) -> bool:
    """Does the complete store at `out` already hold what write_store would write from these arguments and its
    own feature rows? Then extract leaves it alone: same bytes, same mtime, nothing for DVC to re-hash."""
    labels = np.asarray(labels, dtype=np.int64)
    paths = [safe_text(p) for p in paths]
    grp = [g or "" for g in groups] if groups is not None and any(g is not None for g in groups) else None
    try:
        with h5py.File(out, "r") as f:
            ds = f["features"]
            fp = {**fingerprint, "dim": ds.shape[1]}
            same = (int(f.attrs.get("complete", 0)) == 1 and int(f.attrs.get("schema_version", 0)) == SCHEMA_VERSION
                    and ds.dtype == np.dtype(dtype) and ds.shape[0] == len(paths)
                    and f.attrs.get("meta_sha256") == meta_digest(labels, paths, list(sha256), grp, class_names, fp,
                                                                  face_index, face_boxes)
                    and json.loads(f.attrs["fingerprint"]) == fp and str(f.attrs.get("root", "")) == _rel_root(root, out)
                    and records(f, "skipped") == [(safe_text(p), safe_text(r)) for p, r in skipped]
                    and records(f, "conflict") == [(safe_text(p), safe_text(r)) for p, r in conflicts]
                    and all(k in f.attrs and f.attrs[k] == v for k, v in (attrs or {}).items())
                    and ("shard" in f.attrs) == ("shard" in (attrs or {})))
            if same:
                same = [s.decode() for s in f["noface_sha256"][:]] == list(noface) if "noface_sha256" in f \
                    else not noface
            return bool(same)
    except (OSError, KeyError, ValueError, TypeError):
        return False


def write_store(out: str | os.PathLike, *, blocks: Iterable[np.ndarray], dim: int, dtype: str, labels: np.ndarray,
                paths: list[str], sha256: list[str], groups: list[str | None] | None, class_names: list[str],
                fingerprint: dict, root: str = "", skipped: list[tuple[str, str]] = (),
                conflicts: list[tuple[str, str]] = (), attrs: dict | None = None,
                face_index: np.ndarray | None = None, face_boxes: np.ndarray | None = None,
                noface: list[str] = ()) -> str:
    """The one writer of the schema. `blocks` yields feature rows (b, D) in row order, so memory stays O(block);
    the file is built under a temp name and renamed into place when complete. Returns its meta_sha256."""
    n = len(paths)
    labels = np.asarray(labels, dtype=np.int64)
    paths = [safe_text(p) for p in paths]
    grp = [g or "" for g in groups] if groups is not None and any(g is not None for g in groups) else None
    chunk_rows = max(1, min(n, (1 << 20) // (max(dim, 1) * 4)))
    # no object times in the file (track_times): the same rows give the same bytes
    with atomic_file(out) as tmp, h5py.File(tmp, "w") as f:
        ck = dict(fletcher32=True, chunks=True, track_times=False) if n else dict(track_times=False)
        feats = f.create_dataset("features", shape=(n, dim), dtype=dtype, fletcher32=bool(n),
                                 chunks=(chunk_rows, dim) if n else None, track_times=False)
        f.create_dataset("labels", data=labels, **ck)
        f.create_dataset("paths", data=paths, dtype=STR, track_times=False)
        f.create_dataset("sha256", data=np.array(sha256, dtype="S64"), **ck)
        if grp is not None:
            f.create_dataset("groups", data=grp, dtype=STR, track_times=False)
        if face_index is not None:
            f.create_dataset("face_index", data=np.asarray(face_index, np.int32).reshape(n), **ck)
            f.create_dataset("face_boxes", data=np.asarray(face_boxes, np.int32).reshape(n, 4), **ck)
        if noface:
            f.create_dataset("noface_sha256", data=np.array(list(noface), dtype="S64"), fletcher32=True, chunks=True,
                             track_times=False)
        for name, recs in (("skipped", skipped), ("conflict", conflicts)):
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
        fingerprint = {**fingerprint, "dim": dim}
        for k, v in (attrs or {}).items():
            f.attrs[k] = v
        digest = meta_digest(labels, paths, list(sha256), grp, class_names, fingerprint, face_index, face_boxes)
        f.attrs.update({"class_names": json.dumps(class_names), "fingerprint": json.dumps(fingerprint),
                        "backbone": str(fingerprint.get("backbone", "")), "dim": dim, "root": _rel_root(root, out),
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
