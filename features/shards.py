"""Extraction past one process: shard stores (one per Slurm task or torchrun rank) and their assembly.

Every shard `STORE.shard-I-of-K.h5` is a complete store of its own (images assigned by content hash);
`assemble_shards` streams their rows into one ordinary store. Under torchrun, rank 0 assembles after a
gloo barrier.
"""
from __future__ import annotations

import os
import time

import h5py
import numpy as np

from features.storage.atomic import OutputLock
from features.errors import UserError
from features.extract import check_store_out, extract
from features.plan import Summary, shard_path
from features.storage.partial import Where, gather_blocks
from features.storage.store import describe_mismatch, read_store
from features.storage.write import StoreContent, write_store


def torchrun_rank() -> tuple[int, int]:
    """(rank, world size) when launched by torchrun, else (0, 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return (int(os.environ.get("RANK", "0")), world) if world > 1 else (0, 1)


def assemble_shards(*, out: str, num_shards: int) -> Summary:
    """Merge finished shard stores into `out` (streamed, atomic). Refuses missing shards or mixed backbones."""
    t0 = time.time()
    if num_shards < 1:
        raise UserError(f"--num-shards {num_shards}: must be >= 1")
    check_store_out(out)
    shards = [shard_path(out, i, num_shards) for i in range(num_shards)]
    missing = [str(s) for s in shards if not s.exists()]
    if missing:
        raise UserError(f"{out}: {len(missing)} of {num_shards} shards not finished ({missing[0]}...); "
                        "run the missing --shard-index values, then assemble again")
    parts = [read_store(s, features=False) for s in shards]
    fp, names = parts[0].fingerprint, parts[0].class_names
    for s, p in zip(shards, parts):
        if p.fingerprint != fp:
            raise UserError(f"{s}: made with another backbone "
                            f"({describe_mismatch(fp, p.fingerprint, ('shard 0', 'this shard'))}); "
                            "re-extract that shard with the same settings")
        if p.class_names != names:
            raise UserError(f"{s}: classes {p.class_names} differ from {shards[0]}'s {names}; re-extract that shard "
                            "from the same folder or manifest")
        if p.root != parts[0].root:  # its paths are relative to its own root: merged, they would name other files
            raise UserError(f"{s}: extracted from {p.root}, not {parts[0].root} like {shards[0]}; extract every shard "
                            "from the same folder or manifest")
    rows: list[tuple[str, int, int, str, str | None, tuple]] = []  # (path, face, label, row key, group, box)
    where: Where = {}
    faces = parts[0].face_index is not None
    skipped: set[tuple[str, str]] = set()
    conflicts: list[tuple[str, str]] = []
    for s, p in zip(shards, parts):
        groups = p.groups or [None] * len(p)
        index = p.face_index.tolist() if faces else [0] * len(p)
        keys = [f"{sha}:{k}" if faces else sha for sha, k in zip(p.sha256, index)]
        boxes = [tuple(b) for b in p.face_boxes.tolist()] if faces else [()] * len(p)
        rows += list(zip(p.paths, index, p.labels.tolist(), keys, [g or None for g in groups], boxes))
        where.update({key: (s, i) for i, key in enumerate(keys)})
        skipped.update(p.skipped)
        conflicts += p.conflicts
    rows.sort(key=lambda r: r[:2])
    with h5py.File(shards[0], "r") as f:
        dtype = str(f.attrs.get("feature_dtype", "float32"))
        weights_path = str(f.attrs.get("weights_path", ""))
    keys = [r[3] for r in rows]
    content = StoreContent(
        dtype=dtype, labels=np.array([r[2] for r in rows], dtype=np.int64), paths=[r[0] for r in rows],
        sha256=[k.split(":")[0] for k in keys], groups=[r[4] for r in rows], class_names=names, fingerprint=fp,
        root=parts[0].root, skipped=sorted(skipped), conflicts=conflicts,
        attrs={"weights_path": weights_path, "feature_dtype": dtype},
        noface=sorted(set().union(*(p.noface for p in parts))))
    if faces:
        content.face_index = np.array([r[1] for r in rows], np.int32)
        content.face_boxes = np.array([r[5] for r in rows], np.int32).reshape(-1, 4)
    with OutputLock(out):
        write_store(out, content, blocks=gather_blocks(keys, where, parts[0].dim), dim=parts[0].dim)
    images = len({r[0] for r in rows})
    return Summary(out=str(out), reused=images, rows=images, skipped=sorted(skipped), conflicts=conflicts,
                   seconds=time.time() - t0, face_rows=len(rows) if faces else None)


def extract_distributed(*, out: str, rank: int, world: int, echo=print, progress: bool = True, **kw) -> Summary:
    """This rank's shard under torchrun; rank 0 assembles the final store once every shard is on disk."""
    import torch.distributed as dist
    summary = extract(out=out, num_shards=world, shard_index=rank, progress=progress and rank == 0, **kw)
    dist.init_process_group("gloo")
    try:
        dist.barrier()  # every shard is complete on disk
        if rank == 0:
            echo(summary.line())
            summary = assemble_shards(out=out, num_shards=world)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return summary
