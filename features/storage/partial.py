"""Progress of an unfinished extraction (`STORE.h5.partial/`) and the assembly of rows from several sources.

`meta.json` holds the fingerprint; each `chunk-NNNNNN.h5` (row keys (n,), features (n, D), failures, and in face
mode the crop boxes (n, 4)) is written
to a temp name, fsynced and renamed. A SIGKILL at any moment loses at most the chunk being written; the next
run reuses every committed chunk whose checksum holds.
"""
from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np

from features.storage.atomic import fsync_replace
from features.errors import UserError
from features.storage.store import describe_mismatch, partial_dir

Where = dict[str, tuple[Path, int]]  # row key (image sha256, or '<sha256>:<face>') -> (HDF5 file holding it, row)


class Partial:
    """Committed-but-unassembled embeddings of one extraction, keyed by row key (image sha256 or face key)."""

    def __init__(self, store: str | os.PathLike, fingerprint: dict, *, force: bool = False):
        self.dir = partial_dir(store)
        self.fingerprint = fingerprint
        self.where: Where = {}
        self.failed: dict[str, str] = {}  # sha -> reason
        self.boxes: dict[str, tuple[int, ...]] = {}  # face mode: row key -> crop box (x, y, w, h)
        self._next = 0
        meta = self.dir / "meta.json"
        if self.dir.exists() and not self.dir.is_dir():
            raise UserError(f"{self.dir}: a file is where extract keeps its resumable chunks; move it away or pass "
                            "another --out")
        if self.dir.exists():
            try:
                have = json.loads(meta.read_text())["fingerprint"]
            except (OSError, ValueError, KeyError, TypeError):
                have = None
            if have is not None and have != fingerprint and not force:
                why = describe_mismatch(fingerprint, have, ("this run", "the unfinished one"))
                raise UserError(f"{self.dir}: an unfinished extraction with another backbone is here ({why}); re-run "
                                "it with the same backbone to resume, or pass --force to discard it")
            if have != fingerprint:
                self.discard()
        self.dir.mkdir(parents=True, exist_ok=True)
        if not meta.exists():
            tmp = self.dir / "meta.json.tmp"
            tmp.write_text(json.dumps({"fingerprint": fingerprint}))
            fsync_replace(tmp, meta)
        for chunk in sorted(self.dir.glob("chunk-*.h5")):
            try:
                with h5py.File(chunk, "r") as f:
                    shas = [s.decode() for s in f["sha256"][:]]
                    ok = np.isfinite(f["features"][:]).all(1)  # reading verifies the chunk's checksum
                    failed = json.loads(f.attrs.get("failed", "[]"))
                    boxes = f["boxes"][:].tolist() if "boxes" in f else None
                if boxes is not None and len(boxes) != len(shas):
                    raise ValueError("boxes")
                images_bad = {sha.rsplit(":", 1)[0] for sha, good in zip(shas, ok) if not good}
                for row, sha in enumerate(shas):
                    if ok[row] and sha.rsplit(":", 1)[0] not in images_bad:  # an image's crops: all or none
                        self.where[sha] = (chunk, row)
                        if boxes is not None:
                            self.boxes[sha] = tuple(boxes[row])
                self.failed.update(dict(failed))
            except (OSError, KeyError, ValueError, TypeError):
                chunk.unlink(missing_ok=True)  # a damaged chunk: its images are embedded again
            self._next = max(self._next, int(chunk.stem.split("-")[1]) + 1)
        for tmp in self.dir.glob("*.tmp"):
            tmp.unlink(missing_ok=True)  # debris of a commit killed mid-write

    def commit(self, shas: list[str], feats: np.ndarray, failed: dict[str, str], dtype: str,
               boxes: np.ndarray | None = None) -> None:
        """Durably add rows (feats (n, D), face boxes (n, 4)) and failures. After this returns, a kill loses none
        of them."""
        with np.errstate(over="ignore"):  # an overflow becomes inf, and is handled below
            stored = feats.astype(dtype, copy=False)  # (n, D)
        over = ~np.isfinite(stored).all(1)  # float16 holds |x| <= 65504: beyond, a feature is stored as inf and
        if over.any():  # every reader would call the store damaged; such an image fails with the fix instead
            bad = {key.rsplit(":", 1)[0] for key in np.asarray(shas)[over]}  # an image's face rows: all or none
            keep = [i for i, key in enumerate(shas) if key.rsplit(":", 1)[0] not in bad]
            why = f"features beyond {dtype}'s range; extract with --dtype float32 (|x| > {float(np.finfo(dtype).max):.0f})"
            failed = {**failed, **{sha: why for sha in bad}}
            shas, stored, boxes = [shas[i] for i in keep], stored[keep], None if boxes is None else boxes[keep]
        if not shas and not failed:
            return
        dst = self.dir / f"chunk-{self._next:06d}.h5"
        tmp = dst.with_suffix(".h5.tmp")
        with h5py.File(tmp, "w") as f:
            f.create_dataset("sha256", data=np.array(shas, dtype="S80"))  # face keys are '<sha256>:<face>'
            if boxes is not None:
                f.create_dataset("boxes", data=np.asarray(boxes, np.int32).reshape(-1, 4))
            f.create_dataset("features", data=stored, fletcher32=len(shas) > 0,
                             chunks=True if len(shas) else None)
            f.attrs["failed"] = json.dumps(sorted(failed.items()))
        fsync_replace(tmp, dst)
        self._next += 1
        for row, sha in enumerate(shas):
            self.where[sha] = (dst, row)
            if boxes is not None:
                self.boxes[sha] = tuple(int(v) for v in boxes[row])
        self.failed.update(failed)

    def discard(self) -> None:
        if self.dir.exists():
            for p in self.dir.iterdir():
                p.unlink()
            self.dir.rmdir()


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
        self.open.clear()


def gather_blocks(shas: list[str], where: Where, dim: int, block: int = 4096) -> Iterator[np.ndarray]:
    """Feature rows (b, D) for `shas`, in order, read from wherever `where` says each one lives."""
    files = _Files()
    try:
        for i0 in range(0, len(shas), block):
            part = shas[i0:i0 + block]
            buf = np.empty((len(part), dim), dtype=np.float32)  # (b, D)
            by_file: dict[Path, list[tuple[int, int]]] = {}
            for i, sha in enumerate(part):
                src, row = where[sha]
                by_file.setdefault(src, []).append((row, i))
            for src, pairs in by_file.items():
                src_rows = sorted({row for row, _ in pairs})
                data = files.get(src)["features"][src_rows]  # h5py wants increasing indices
                pos = {row: k for k, row in enumerate(src_rows)}
                for row, i in pairs:
                    buf[i] = data[pos[row]]
            yield buf
    finally:
        files.close()
