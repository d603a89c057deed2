"""The HDF5 feature store: schema, fingerprint, lock, crash-safe chunked commits, atomic assembly.

A complete store is one plain HDF5 file anyone can read with h5py:
    features (N, D) float32|float16, chunked by rows      labels (N,) int64, -1 = unlabelled
    paths (N,) UTF-8 (relative to attr `root`)            sha256 (N,) hex of the image bytes
    groups (N,) UTF-8 (only when the manifest had `group`)
    skipped_paths / skipped_reasons (K,) UTF-8            conflict_paths / conflict_reasons (M,) UTF-8
    attrs: class_names (JSON), backbone, weights_sha256, preprocess (JSON), dim, fingerprint (JSON),
           root, schema_version, complete=1, created
It only ever appears by `os.replace` of a finished temporary file, so readers never see half of one.

While extracting, progress lives in `STORE.h5.partial/`: `meta.json` (the fingerprint) plus
`chunk-NNNNNN.h5` files, each written to a temp name, fsynced and renamed. A SIGKILL at any moment
loses at most the chunk being written; the next run reuses every committed chunk.
"""
from __future__ import annotations

import json
import os
import socket
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from features.errors import UserError

SCHEMA_VERSION = 1
STR = h5py.string_dtype("utf-8")
INCOMPLETE = "incomplete store, re-run extract to resume"


def partial_dir(store: str | os.PathLike) -> Path:
    return Path(f"{store}.partial")


def lock_path(store: str | os.PathLike) -> Path:
    return Path(f"{store}.lock")


def _safe(s: str) -> str:
    """File names that are not valid UTF-8 (surrogate-escaped by Python) are stored with \\x escapes."""
    return s.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


# --------------------------------------------------------------------------- reading

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

    def __len__(self) -> int:
        return len(self.paths)


def _records(f: h5py.File, name: str) -> list[tuple[str, str]]:
    if f"{name}_paths" not in f:
        return []
    return list(zip(f[f"{name}_paths"].asstr()[:], f[f"{name}_reasons"].asstr()[:]))


def read_store(path: str | os.PathLike, *, features: bool = True) -> Store:
    """Open a complete store; every failure is a one-line UserError naming the file and the fix."""
    p = Path(path)
    if not p.exists():
        if partial_dir(p).exists():
            raise UserError(f"{p}: {INCOMPLETE}")
        raise UserError(f"{p}: no such store; create it with `imgsent extract IMAGES --out {p}`")
    try:
        with h5py.File(p, "r") as f:
            missing = [k for k in ("features", "labels", "paths", "sha256") if k not in f]
            missing += [k for k in ("class_names", "fingerprint") if k not in f.attrs]
            if missing:
                raise UserError(f"{p}: not an imgsent store (missing {', '.join(missing)}); re-create it with imgsent extract")
            if int(f.attrs.get("complete", 0)) != 1:
                raise UserError(f"{p}: {INCOMPLETE}")
            feats = f["features"][:].astype(np.float32, copy=False) if features else None
            groups = list(f["groups"].asstr()[:]) if "groups" in f else None
            return Store(path=str(p), features=feats, labels=f["labels"][:].astype(np.int64),
                         paths=list(f["paths"].asstr()[:]), sha256=[s.decode() for s in f["sha256"][:]],
                         groups=groups, class_names=json.loads(f.attrs["class_names"]),
                         fingerprint=json.loads(f.attrs["fingerprint"]), root=str(f.attrs.get("root", "")),
                         skipped=_records(f, "skipped"), conflicts=_records(f, "conflict"),
                         shard=json.loads(f.attrs["shard"]) if "shard" in f.attrs else None,
                         weights_path=str(f.attrs.get("weights_path", "")) or None)
    except OSError as e:
        raise UserError(f"{p}: not a readable HDF5 file ({e}); re-create it with imgsent extract") from None


def store_fingerprint(path: str | os.PathLike) -> dict | None:
    """The fingerprint of a complete store, or None if there is none at `path`."""
    try:
        with h5py.File(path, "r") as f:
            return json.loads(f.attrs["fingerprint"]) if int(f.attrs.get("complete", 0)) == 1 else None
    except (OSError, KeyError):
        return None


def describe_mismatch(want: dict, have: dict) -> str:
    for key in ("backbone", "weights_sha256", "preprocess", "dim"):
        if want.get(key) != have.get(key):
            return f"{key} {have.get(key)!r} != {want.get(key)!r}"
    return "identical"


# --------------------------------------------------------------------------- lock

class StoreLock:
    """One writer per store: an O_EXCL lock file holding pid and host; a dead holder's lock is stale."""

    def __init__(self, store: str | os.PathLike):
        self.path = lock_path(store)
        self.store = store

    def __enter__(self) -> "StoreLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder and not self._alive(holder):
                    self.path.unlink(missing_ok=True)  # stale: its process is gone
                    continue
                who = f"PID {holder.get('pid')} on {holder.get('host')}" if holder else "another process"
                raise UserError(f"{self.store} is being written by {who} (lock {self.path}); wait for it to finish, "
                                f"or delete the lock if that process is gone") from None
            with os.fdopen(fd, "w") as f:
                json.dump({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}, f)
            return self
        raise UserError(f"{self.store}: could not take the lock {self.path}; delete it if no extract is running")

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            # A lock file being written right now is empty for an instant; treat an old empty one as stale.
            try:
                return None if time.time() - self.path.stat().st_mtime > 5 else {"pid": "?", "host": "?"}
            except OSError:
                return None

    @staticmethod
    def _alive(holder: dict) -> bool:
        if holder.get("host") != socket.gethostname():
            return True  # cannot check another machine: assume it is alive
        try:
            os.kill(int(holder["pid"]), 0)
        except ProcessLookupError:
            return False
        except (PermissionError, ValueError, TypeError):
            return True
        return True

    def __exit__(self, *exc) -> None:
        self.path.unlink(missing_ok=True)


# --------------------------------------------------------------------------- partial progress

def _fsync_replace(tmp: Path, dst: Path) -> None:
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, dst)
    try:  # make the rename itself durable
        dfd = os.open(dst.parent, os.O_RDONLY)
        os.fsync(dfd)
        os.close(dfd)
    except OSError:
        pass


class Partial:
    """Committed-but-unassembled embeddings of one extraction, keyed by image sha256."""

    def __init__(self, store: str | os.PathLike, fingerprint: dict, *, force: bool = False):
        self.dir = partial_dir(store)
        self.fingerprint = fingerprint
        self.where: dict[str, tuple[Path, int]] = {}  # sha -> (chunk file, row)
        self.failed: dict[str, str] = {}  # sha -> reason
        self._next = 0
        meta = self.dir / "meta.json"
        if self.dir.exists():
            try:
                have = json.loads(meta.read_text())["fingerprint"]
            except (OSError, ValueError, KeyError):
                have = None
            if have is not None and have != fingerprint and not force:
                raise UserError(f"{self.dir}: an unfinished extraction with another backbone is here "
                                f"({describe_mismatch(fingerprint, have)}); re-run it with the same backbone to resume, "
                                "or pass --force to discard it")
            if have != fingerprint:
                self.discard()
        self.dir.mkdir(parents=True, exist_ok=True)
        if not meta.exists():
            tmp = self.dir / "meta.json.tmp"
            tmp.write_text(json.dumps({"fingerprint": fingerprint}))
            _fsync_replace(tmp, meta)
        for chunk in sorted(self.dir.glob("chunk-*.h5")):
            try:
                with h5py.File(chunk, "r") as f:
                    for row, sha in enumerate(f["sha256"][:]):
                        self.where[sha.decode()] = (chunk, row)
                    for sha, why in json.loads(f.attrs.get("failed", "[]")):
                        self.failed[sha] = why
            except (OSError, KeyError, ValueError):
                chunk.unlink(missing_ok=True)  # cannot happen with rename-commit, but never trust a bad chunk
            self._next = max(self._next, int(chunk.stem.split("-")[1]) + 1)
        for tmp in self.dir.glob("*.tmp"):
            tmp.unlink(missing_ok=True)  # debris of a commit killed mid-write

    def commit(self, shas: list[str], feats: np.ndarray, failed: dict[str, str], dtype: str) -> None:
        """Durably add rows (feats (n, D)) and failures. After this returns, a kill loses none of them."""
        if not shas and not failed:
            return
        dst = self.dir / f"chunk-{self._next:06d}.h5"
        tmp = dst.with_suffix(".h5.tmp")
        with h5py.File(tmp, "w") as f:
            f.create_dataset("sha256", data=np.array(shas, dtype="S64"))
            f.create_dataset("features", data=feats.astype(dtype, copy=False))
            f.attrs["failed"] = json.dumps(sorted(failed.items()))
        _fsync_replace(tmp, dst)
        self._next += 1
        for row, sha in enumerate(shas):
            self.where[sha] = (dst, row)
        self.failed.update(failed)

    def discard(self) -> None:
        if self.dir.exists():
            for p in self.dir.iterdir():
                p.unlink()
            self.dir.rmdir()


# --------------------------------------------------------------------------- assembly

@dataclass
class Row:
    path: str
    label: int
    sha256: str
    group: str | None


class _Files:
    """A few open HDF5 files at a time: assembling may read thousands of chunk files."""

    def __init__(self, size: int = 16):
        self.open: OrderedDict[Path, h5py.File] = OrderedDict()
        self.size = size

    def get(self, path: Path) -> h5py.File:
        if path in self.open:
            self.open.move_to_end(path)
        else:
            if len(self.open) >= self.size:
                self.open.popitem(last=False)[1].close()
            self.open[path] = h5py.File(path, "r")
        return self.open[path]

    def close(self) -> None:
        for f in self.open.values():
            f.close()


def write_store(out: str | os.PathLike, *, rows: list[Row], where: dict[str, tuple[Path, int]], dim: int,
                dtype: str, attrs: dict, skipped: list[tuple[str, str]], conflicts: list[tuple[str, str]],
                block: int = 4096) -> None:
    """Stream the final store into a temp file, block by block (memory stays O(block x D)), then rename.

    `where[sha]` says which HDF5 file (an old store, a chunk, a shard) holds that image's vector, and at which row.
    """
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    n = len(rows)
    files = _Files()
    try:
        with h5py.File(tmp, "w") as f:
            feats = f.create_dataset("features", shape=(n, dim), dtype=dtype,
                                     chunks=(max(1, min(n, max(1, (1 << 20) // (dim * 4)))), dim) if n else None)
            f.create_dataset("labels", data=np.array([r.label for r in rows], dtype=np.int64))
            f.create_dataset("paths", data=[_safe(r.path) for r in rows], dtype=STR)
            f.create_dataset("sha256", data=np.array([r.sha256 for r in rows], dtype="S64"))
            if any(r.group is not None for r in rows):
                f.create_dataset("groups", data=[r.group or "" for r in rows], dtype=STR)
            for name, recs in (("skipped", skipped), ("conflict", conflicts)):
                f.create_dataset(f"{name}_paths", data=[_safe(p) for p, _ in recs], dtype=STR)
                f.create_dataset(f"{name}_reasons", data=[r for _, r in recs], dtype=STR)
            for i0 in range(0, n, block):
                part = rows[i0:i0 + block]
                buf = np.empty((len(part), dim), dtype=np.float32)  # (b, D)
                by_file: dict[Path, list[tuple[int, int]]] = {}
                for i, r in enumerate(part):
                    src, row = where[r.sha256]
                    by_file.setdefault(src, []).append((row, i))
                for src, pairs in by_file.items():
                    src_rows = sorted({row for row, _ in pairs})
                    data = files.get(src)["features"][src_rows]  # h5py wants increasing indices
                    pos = {row: k for k, row in enumerate(src_rows)}
                    for row, i in pairs:
                        buf[i] = data[pos[row]]
                feats[i0:i0 + len(part)] = buf
            for k, v in attrs.items():
                f.attrs[k] = v
            f.attrs["schema_version"] = SCHEMA_VERSION
            f.attrs["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            f.attrs["complete"] = 1  # last: a store without it is never read
        files.close()
        _fsync_replace(tmp, out)
    finally:
        files.close()
        tmp.unlink(missing_ok=True)
