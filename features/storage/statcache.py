"""Extract's stat cache beside a store, `STORE.h5.stat`: which file each row came from as the file system saw
it (size, mtime_ns, inode) when a hashing pass started, plus the key its fingerprint was derived from.

It lives outside the store because it describes this machine and this checkout, not the features: the store
itself then has the same bytes for the same images and settings wherever it is made (a fresh clone's
`dvc repro` leaves dvc.lock alone), while a re-run here still skips hashing unchanged files. The sidecar names
the store content it belongs to (`meta_sha256`); a missing, damaged or stale one only costs a full re-hash.
DVC ignores it (.dvcignore).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from features.storage.atomic import atomic_file


def stat_path(store: str | os.PathLike) -> Path:
    store = Path(store)
    return store.with_name(store.name + ".stat")


def write_stat_cache(store: str | os.PathLike, *, meta_sha256: str, file_stats: np.ndarray, stat_time_ns: int,
                     fingerprint_key: dict | None) -> None:
    """Record the stats (N, 3) of the rows of the store whose metadata digest is `meta_sha256`."""
    info = json.dumps({"meta_sha256": meta_sha256, "stat_time_ns": int(stat_time_ns),
                       "fingerprint_key": fingerprint_key}, sort_keys=True)
    try:
        with atomic_file(stat_path(store)) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, file_stats=np.asarray(file_stats, np.int64).reshape(-1, 3), info=np.array(info))
    except Exception:  # noqa: BLE001 - a cache: failing to write it only costs the next run a re-hash
        pass


def read_stat_cache(store: str | os.PathLike, meta_sha256: str, rows: int) -> tuple[np.ndarray, int, dict | None] | None:
    """(file_stats (rows, 3), stat_time_ns, fingerprint_key) if the sidecar belongs to this very store content,
    else None."""
    try:
        with np.load(stat_path(store), allow_pickle=False) as z:
            info = json.loads(str(z["info"]))
            stats = z["file_stats"].astype(np.int64)
    except Exception:  # noqa: BLE001 - missing, truncated, foreign: no cache
        return None
    if info.get("meta_sha256") != meta_sha256 or stats.shape != (rows, 3):
        return None
    return stats, int(info.get("stat_time_ns", 0)), info.get("fingerprint_key")
