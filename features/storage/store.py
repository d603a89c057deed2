"""The HDF5 feature store: its schema and validated reading (the one writer is features/storage/write.py).

A complete store is one plain HDF5 file anyone can read with h5py:
    features (N, D) float32|float16, chunked by rows, fletcher32 checksum per chunk
    labels (N,) int64, -1 = unlabelled (fletcher32)     sha256 (N,) S64 hex of the image bytes (fletcher32)
    paths (N,) UTF-8 (relative to attr `root`)          groups (N,) UTF-8 (only when the manifest had `group`)
    skipped_paths / skipped_reasons (K,) UTF-8          conflict_paths / conflict_reasons (M,) UTF-8
    face mode only (fingerprint["faces"], features/models/faces.py): one row per face crop, so an image may have several
    face_index (N,) int32 0.. within the image            face_boxes (N, 4) int32 crop x, y, w, h (upright pixels)
    noface_sha256 (F,) S64: images where these face settings found no face (not searched again on a re-run)
    attrs: class_names (JSON), backbone, weights_sha256, preprocess (JSON), dim, fingerprint (JSON), root
           (relative to the store's folder when it can be), meta_sha256 (digest of labels, paths, sha256, groups,
           class names, fingerprint), schema_version=2, complete=1
It only ever appears by rename of a finished temporary file, so readers never see half of one. A flipped
byte in the features fails its chunk's checksum; one in the metadata fails `meta_sha256`. Nothing in it
depends on the machine, the checkout's location, file times or the clock (no HDF5 object times either): the
same images and settings give the same bytes. Extract's stat cache lives beside it (features/storage/statcache.py).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from features.errors import UserError

SCHEMA_VERSION = 2
STR = h5py.string_dtype("utf-8")
INCOMPLETE = "incomplete store, re-run extract to resume"
REQUIRED = ("features", "labels", "paths", "sha256")


def partial_dir(store: str | os.PathLike) -> Path:
    return Path(f"{store}.partial")


def _damaged(p: Path, what: str) -> UserError:
    return UserError(f"{p}: damaged store ({what}); re-run imgsent extract to re-embed it")


@dataclass
class Store:
    path: str
    features: np.ndarray | None  # (N, D) float32, None when read with features=False
    labels: np.ndarray  # (N,) int64
    paths: list[str]
    sha256: list[str]
    groups: list[str] | None
    class_names: list[str]
    fingerprint: dict
    root: str
    skipped: list[tuple[str, str]] = field(default_factory=list)
    conflicts: list[tuple[str, str]] = field(default_factory=list)
    shard: dict | None = None
    weights_path: str | None = None  # local --weights file, if any: predict needs it to rebuild the backbone
    dim: int = 0
    schema_version: int = SCHEMA_VERSION
    meta_sha256: str = ""  # the digest of its metadata: what the stat cache beside it must name
    face_index: np.ndarray | None = None  # (N,) int32, face mode only: which face of its image a row is
    face_boxes: np.ndarray | None = None  # (N, 4) int32, face mode only: the crop (x, y, w, h) the row embeds
    noface: list[str] = field(default_factory=list)  # face mode: sha256 of images with no face found

    def __len__(self) -> int:
        return len(self.paths)


def meta_digest(labels: np.ndarray, paths: list[str], sha256: list[str], groups: list[str] | None,
                class_names: list[str], fingerprint: dict, face_index: np.ndarray | None = None,
                face_boxes: np.ndarray | None = None) -> str:
    h = hashlib.sha256()
    if face_index is not None:  # face mode; stores without faces keep the digest they always had
        h.update(np.ascontiguousarray(face_index, dtype="<i4").tobytes())
        h.update(np.ascontiguousarray(face_boxes, dtype="<i4").tobytes())
    h.update(np.ascontiguousarray(labels, dtype="<i8").tobytes())
    for part in (paths, sha256, groups or [], class_names):
        h.update("\n".join(part).encode("utf-8", "surrogateescape") + b"\0")
    h.update(json.dumps(fingerprint, sort_keys=True).encode())
    return h.hexdigest()


def records(f: h5py.File, name: str) -> list[tuple[str, str]]:
    if f"{name}_paths" not in f:
        return []
    return list(zip(f[f"{name}_paths"].asstr()[:], f[f"{name}_reasons"].asstr()[:]))


def _json_attr(f: h5py.File, p: Path, key: str, kind: type):
    try:
        v = json.loads(f.attrs[key])
    except (ValueError, TypeError):
        raise _damaged(p, f"attribute {key} is not valid JSON") from None
    if not isinstance(v, kind):
        raise _damaged(p, f"attribute {key} is not a {kind.__name__}")
    return v


def read_store(path: str | os.PathLike, *, features: bool = True) -> Store:
    """Open a complete store and validate it; every failure is a one-line UserError naming the file and the fix.
    With `features=True` every feature chunk's checksum is verified and the values must be finite."""
    p = Path(path)
    if not p.exists():
        if partial_dir(p).exists():
            raise UserError(f"{p}: {INCOMPLETE}")
        raise UserError(f"{p}: no such store; create it with `imgsent extract IMAGES --out {p}`")
    if p.is_dir():
        raise UserError(f"{p}: is a folder, not a store; pass the .h5 file made by imgsent extract")
    try:
        f = h5py.File(p, "r")
    except OSError:
        raise UserError(f"{p}: not an HDF5 file (truncated, damaged or another format); "
                        "re-create it with imgsent extract") from None
    try:
        with f:
            return _read(f, p, features)
    except OSError as e:  # HDF5 errors while reading: a failed checksum, a truncated file
        raise _damaged(p, f"unreadable data: {str(e).splitlines()[0][:80]}") from None


def _read(f: h5py.File, p: Path, features: bool) -> Store:
    missing = [k for k in REQUIRED if k not in f] + [k for k in ("class_names", "fingerprint") if k not in f.attrs]
    if missing:
        raise UserError(f"{p}: not an imgsent store (missing {', '.join(missing)}); re-create it with imgsent extract")
    if int(f.attrs.get("complete", 0)) != 1:
        raise UserError(f"{p}: {INCOMPLETE}")
    version = int(f.attrs.get("schema_version", 1))
    if version > SCHEMA_VERSION:
        raise UserError(f"{p}: made by a newer imgsent (store schema {version}); upgrade imgsent")
    class_names = _json_attr(f, p, "class_names", list)
    fingerprint = _json_attr(f, p, "fingerprint", dict)
    ds = f["features"]
    if ds.ndim != 2 or ds.dtype not in (np.float32, np.float16):
        raise _damaged(p, f"features has shape {ds.shape} and dtype {ds.dtype}, expected (N, D) float")
    n, d = ds.shape
    labels = f["labels"][:]
    sha = [s.decode("ascii", "replace") for s in f["sha256"][:]]
    paths = list(f["paths"].asstr(errors="surrogateescape")[:])
    groups = list(f["groups"].asstr()[:]) if "groups" in f else None
    if not (len(labels) == len(sha) == len(paths) == n) or groups is not None and len(groups) != n:
        raise _damaged(p, f"{n} feature rows but {len(labels)} labels, {len(paths)} paths, {len(sha)} hashes")
    if fingerprint.get("dim") not in (None, d):
        raise _damaged(p, f"fingerprint says dim {fingerprint.get('dim')}, features have {d} columns")
    if labels.dtype.kind not in "iu" or n and (labels.min() < -1 or labels.max() >= len(class_names)):
        raise _damaged(p, f"labels outside -1..{len(class_names) - 1}")
    if not all(isinstance(c, str) and c for c in class_names) or len(set(class_names)) != len(class_names):
        raise _damaged(p, "class_names must be distinct non-empty strings")
    labels = labels.astype(np.int64)
    face_index = face_boxes = None
    if fingerprint.get("faces"):
        if "face_index" not in f or "face_boxes" not in f:
            raise _damaged(p, "face mode store without face_index / face_boxes")
        face_index, face_boxes = f["face_index"][:].astype(np.int32), f["face_boxes"][:].astype(np.int32)
        if face_index.shape != (n,) or face_boxes.shape != (n, 4):
            raise _damaged(p, f"{n} rows but face_index {face_index.shape}, face_boxes {face_boxes.shape}")
    if version >= 2:
        want = str(f.attrs.get("meta_sha256", ""))
        if want != meta_digest(labels, paths, sha, groups, class_names, fingerprint, face_index, face_boxes):
            raise _damaged(p, "labels, paths or hashes do not match their checksum")
    elif features:
        raise UserError(f"{p}: made by an older imgsent (store schema 1, no checksums); re-run imgsent extract "
                        "on it to upgrade (its features are reused)")
    feats = None
    if features:
        feats = np.empty((n, d), np.float32)  # (N, D)
        for s in ds.iter_chunks() if ds.chunks else [np.s_[0:n, 0:d]]:
            feats[s] = ds[s]
        if not np.isfinite(feats).all():
            bad = int(np.flatnonzero(~np.isfinite(feats).all(1))[0])
            raise _damaged(p, f"non-finite features, first at row {bad}")
    root = str(f.attrs.get("root", ""))
    if root and not os.path.isabs(root):  # relative to the store's folder
        root = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(p)), root))
    return Store(path=str(p), features=feats, labels=labels, paths=paths, sha256=sha, groups=groups,
                 class_names=class_names, fingerprint=fingerprint, root=root,
                 skipped=records(f, "skipped"), conflicts=records(f, "conflict"),
                 shard=json.loads(f.attrs["shard"]) if "shard" in f.attrs else None,
                 weights_path=str(f.attrs.get("weights_path", "")) or None, dim=d, schema_version=version,
                 meta_sha256=str(f.attrs.get("meta_sha256", "")),
                 face_index=face_index, face_boxes=face_boxes,
                 noface=[s.decode("ascii", "replace") for s in f["noface_sha256"][:]] if "noface_sha256" in f else [])


def damaged_rows(path: str | os.PathLike) -> np.ndarray:
    """Rows of a store whose feature chunk fails its checksum or holds non-finite values (bool (N,))."""
    with h5py.File(path, "r") as f:
        ds = f["features"]
        bad = np.zeros(ds.shape[0], bool)
        for s in ds.iter_chunks() if ds.chunks else [np.s_[0:ds.shape[0], 0:ds.shape[1]]]:
            try:
                bad[s[0]] |= ~np.isfinite(ds[s]).all(1)
            except OSError:  # the chunk fails its checksum: every row in it is suspect
                bad[s[0]] = True
        return bad


def is_store(path: str | os.PathLike) -> bool:
    """Is `path` an HDF5 file holding a store (complete or from an older schema)? For --out checks."""
    try:
        with h5py.File(path, "r") as f:
            return all(k in f for k in REQUIRED)
    except OSError:
        return False


def store_fingerprint(path: str | os.PathLike, *, key: dict | None = None) -> dict | None:
    """The fingerprint of a complete store, or None if there is none at `path`. With `key` (what a fingerprint
    comes from: features.models.backbones.fingerprint_key), only if the store recorded that same key: then a re-run
    knows the fingerprint without building the network."""
    try:
        with h5py.File(path, "r") as f:
            if int(f.attrs.get("complete", 0)) != 1:
                return None
            if key is not None:
                from features.storage.statcache import read_stat_cache
                cache = read_stat_cache(path, str(f.attrs.get("meta_sha256", "")), f["features"].shape[0])
                if cache is None or cache[2] != key:
                    return None
            return json.loads(f.attrs["fingerprint"])
    except (OSError, KeyError, ValueError):
        return None


def other_imgsent(a: dict, b: dict) -> bool:
    """Two fingerprints that differ only in the preprocessing version: the same settings, another imgsent's pixels."""
    pa, pb = a.get("preprocess"), b.get("preprocess")
    return isinstance(pa, dict) and isinstance(pb, dict) and pa != pb and {**pa, "version": 0} == {**pb, "version": 0} \
        and {k: v for k, v in a.items() if k != "preprocess"} == {k: v for k, v in b.items() if k != "preprocess"}


def describe_mismatch(want: dict, have: dict, names: tuple[str, str] = ("wanted", "found")) -> str:
    """How fingerprint `have` differs from `want`, the first difference, each value named by its role in `names`:
    'preprocessing version 4 (the model) != 5 (this imgsent): made by another imgsent'."""
    for key in ("backbone", "weights_sha256", "preprocess", "dim"):
        old, new = have.get(key), want.get(key)
        if old != new and other_imgsent(want, have):  # the same settings, another imgsent's pixels
            return (f"preprocessing version {old.get('version')} ({names[1]}) != {new.get('version')} ({names[0]}): "
                    "made by another imgsent")
        if old != new:
            return f"{key} {old!r} ({names[1]}) != {new!r} ({names[0]})"
    if want.get("faces") != have.get("faces"):  # features/models/faces.py: face crops vs whole images, or other settings
        mode = lambda fp: (fp.get("faces") or {}).get("mode", "off")  # noqa: E731
        if mode(want) != mode(have):
            return f"--faces {mode(have)} != {mode(want)}"
        diff = sorted(k for k in want["faces"] if want["faces"][k] != have["faces"].get(k))
        return f"face settings differ ({', '.join(diff)})"
    return "identical"


