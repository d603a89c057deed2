"""Stage one: images -> frozen backbone -> HDF5 feature store, incremental by image content.

    discover -> hash (sha256 of bytes) -> reuse what the old store / partial chunks already hold
    -> decode + resize in DataLoader workers (uint8) -> forward in batches -> commit chunks -> assemble

Killed at any point, a re-run of the same command resumes from the last committed chunk.
Sharding (`--num-shards/--shard-index`, or torchrun's RANK/WORLD_SIZE) splits images by content hash;
each shard is a complete store of its own, and `assemble_shards` merges them into the final one.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from features.backbones import Backbone, load_backbone, prepare
from features.errors import UserError
from features.images import decode, discover, hash_items
from features.store import (Partial, Row, StoreLock, describe_mismatch, partial_dir, read_store, store_fingerprint,
                            write_store)


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived; committed work is safe and the message says how to resume."""


@dataclass
class Summary:
    out: str
    reused: int = 0
    extracted: int = 0
    removed: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    conflicts: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    embed_seconds: float = 0.0  # decode + forward only
    rows: int = 0

    def line(self) -> str:
        rate = f", {self.extracted / self.embed_seconds:.1f} img/s embedding" if self.embed_seconds > 0 else ""
        return (f"{self.out}: {self.rows} images ({self.reused} reused, {self.extracted} extracted, {self.removed} removed, "
                f"{len(self.skipped)} skipped, {len(self.conflicts)} label conflicts) in {self.seconds:.1f} s{rate}")


# --------------------------------------------------------------------------- embedding loop

_TEST_DELAY = float(os.environ.get("IMGSENT_TEST_DELAY", "0") or 0)


class _Images(Dataset):
    def __init__(self, paths: list[str], backbone: Backbone):
        self.paths, self.pre = paths, backbone.pre
        self.blank = torch.zeros(1 if self.pre.grayscale else 3, self.pre.size, self.pre.size, dtype=torch.uint8)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        if _TEST_DELAY:
            time.sleep(_TEST_DELAY)  # fault-injection tests slow extraction down to kill it mid-run
        try:
            return prepare(decode(self.paths[i], draft=self.pre.resize), self.pre), ""
        except ValueError as e:
            return self.blank, str(e)
        except Exception as e:  # noqa: BLE001 - a decoder bug on one file must not stop a long run
            return self.blank, f"cannot decode: {e.__class__.__name__}: {e}"


def _worker_init(_: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    torch.set_num_threads(1)


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU visible; use --device cpu or auto")
    if device not in ("cpu", "cuda"):
        raise UserError(f"--device {device}: expected auto, cpu or cuda")
    return device


def fast_model(backbone: Backbone, device: str, batch_size: int) -> torch.nn.Module:
    """channels_last + TorchScript freeze (folds BatchNorm into convs): ~2-3x eager NCHW on CPU.
    Falls back to the eager model for architectures that do not trace."""
    model = backbone.model.to(device).to(memory_format=torch.channels_last)
    c = 1 if backbone.pre.grayscale else 3
    example = torch.zeros(batch_size, c, backbone.pre.size, backbone.pre.size, dtype=torch.uint8, device=device)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # jit is deprecated (FutureWarning) but still the fastest CPU path here
            traced = torch.jit.freeze(torch.jit.trace(model, example.contiguous(memory_format=torch.channels_last),
                                                      check_trace=False))
            traced(example)  # let the profiling executor specialise once
        return traced
    except Exception:  # noqa: BLE001 - tracing is an optimisation only
        return model


def iter_embeddings(backbone: Backbone, paths: list[str], *, batch_size: int = 32, workers: int = 1,
                    device: str = "cpu", progress: bool = True, desc: str = "extract",
                    model: torch.nn.Module | None = None) -> Iterator[tuple[list[int], np.ndarray, dict[int, str]]]:
    """Yield (indices, features (b, D) float32, {index: error}) per batch; failed images have no row."""
    if not paths:
        return
    model = model or fast_model(backbone, device, batch_size)
    cuda = device == "cuda"
    loader = DataLoader(_Images(paths, backbone), batch_size=batch_size, num_workers=workers,
                        worker_init_fn=_worker_init if workers else None, pin_memory=cuda,
                        prefetch_factor=4 if workers else None, persistent_workers=False)
    bar = tqdm(total=len(paths), desc=desc, unit="img", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    start = 0
    for x, errs in loader:  # x: (b, C, S, S) uint8
        idx = list(range(start, start + len(errs)))
        start += len(errs)
        ok = [k for k, e in enumerate(errs) if not e]
        feats = np.empty((0, backbone.dim), np.float32)
        if ok:
            xb = x[ok] if len(ok) < len(errs) else x
            xb = xb.to(device, non_blocking=cuda).contiguous(memory_format=torch.channels_last)
            # inference_mode only around the forward: a context held across `yield` would leak into the caller
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                feats = model(xb).float().cpu().numpy()  # (b, D)
        bar.update(len(errs))
        yield [idx[k] for k in ok], feats, {idx[k]: e for k, e in enumerate(errs) if e}
    bar.close()


# --------------------------------------------------------------------------- the stage

def shard_of(sha: str, num_shards: int) -> int:
    return int(sha[:15], 16) % num_shards


def shard_path(out: str | os.PathLike, index: int, num_shards: int) -> Path:
    out = Path(out)
    return out.with_name(f"{out.stem}.shard-{index:05d}-of-{num_shards:05d}{out.suffix}")


def extract(*, images: str, out: str, backbone: str = "efficientnet_lite0", weights: str | None = None,
            batch_size: int = 32, workers: int = 1, device: str = "auto", dtype: str = "float32",
            force: bool = False, classes: list[str] | None = None, allow_outside: bool = False,
            commit_every: int = 256, num_shards: int = 1, shard_index: int = 0, progress: bool = True,
            stop_after: int | None = None) -> Summary:
    """Bring the store at `out` up to date with `images`. Returns the summary (skips included)."""
    if dtype not in ("float32", "float16"):
        raise UserError(f"--dtype {dtype}: expected float32 or float16")
    if batch_size < 1 or workers < 0:
        raise UserError(f"--batch-size {batch_size} / --workers {workers}: need batch-size >= 1 and workers >= 0")
    if not 0 <= shard_index < num_shards:
        raise UserError(f"--shard-index {shard_index}: must be in 0..{num_shards - 1} for --num-shards {num_shards}")
    t0 = time.time()
    source = discover(images, classes=classes, allow_outside=allow_outside)
    target = Path(out) if num_shards == 1 else shard_path(out, shard_index, num_shards)
    target.parent.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(device)
    bb = load_backbone(backbone, weights=weights, device=dev)
    fp = bb.fingerprint
    with StoreLock(target):
        old_fp = store_fingerprint(target)
        if old_fp is not None and old_fp != fp and not force:
            raise UserError(f"{target} was made with another backbone ({describe_mismatch(fp, old_fp)}); "
                            f"use another --out, the same backbone, or --force to rebuild it")
        old = read_store(target, features=False) if old_fp == fp else None
        where: dict[str, tuple[Path, int]] = {}
        if old is not None:
            where = {sha: (target, i) for i, sha in enumerate(old.sha256)}
        partial = Partial(target, fp, force=force)
        where.update(partial.where)

        hashes = hash_items(source.items)
        summary = Summary(out=str(target), skipped=list(source.problems))
        rows: list[Row] = []
        todo: dict[str, str] = {}  # sha -> abspath, first path wins for identical images
        label_of_sha: dict[str, tuple[str, str | None]] = {}
        index = {c: i for i, c in enumerate(source.class_names)}
        for item, (sha, err) in zip(source.items, hashes):
            if err:
                summary.skipped.append((item.path, err))
                continue
            if num_shards > 1 and shard_of(sha, num_shards) != shard_index:
                continue
            if sha in partial.failed:
                summary.skipped.append((item.path, partial.failed[sha]))
                continue
            first = label_of_sha.setdefault(sha, (item.path, item.label))
            if first[1] != item.label:
                summary.conflicts.append((item.path, f"identical to {first[0]} which is labelled {first[1]!r}, "
                                                     f"this one {item.label!r}"))
            rows.append(Row(item.path, index[item.label] if item.label is not None else -1, sha, item.group))
            if sha not in where:
                todo.setdefault(sha, item.abspath)
        summary.reused = sum(1 for r in rows if r.sha256 in where)

        t_embed = time.time()
        _embed_and_commit(bb, todo, partial, summary, batch_size=batch_size, workers=workers, device=dev,
                          dtype=dtype, commit_every=commit_every, progress=progress, stop_after=stop_after)
        summary.embed_seconds = time.time() - t_embed if todo else 0.0

        failed = set(partial.failed)
        bad_rows = [r for r in rows if r.sha256 in failed]
        summary.skipped += [(r.path, partial.failed[r.sha256]) for r in bad_rows]
        rows = [r for r in rows if r.sha256 not in failed]
        where.update(partial.where)
        if old is not None:
            kept = {r.path for r in rows}
            summary.removed = sum(1 for p in old.paths if p not in kept)
        attrs = {"class_names": json.dumps(source.class_names), "backbone": bb.name,
                 "weights_sha256": bb.weights_sha256, "preprocess": bb.pre.to_json(), "dim": bb.dim,
                 "fingerprint": json.dumps(fp), "root": source.root,
                 "weights_path": str(Path(weights).resolve()) if weights else "", "feature_dtype": dtype}
        if num_shards > 1:
            attrs["shard"] = json.dumps({"index": shard_index, "count": num_shards})
        write_store(target, rows=rows, where=where, dim=bb.dim, dtype=dtype, attrs=attrs,
                    skipped=sorted(set(summary.skipped)), conflicts=summary.conflicts)
        partial.discard()
    summary.rows = len(rows)
    summary.seconds = time.time() - t0
    return summary


def _embed_and_commit(bb: Backbone, todo: dict[str, str], partial: Partial, summary: Summary, *, batch_size: int,
                      workers: int, device: str, dtype: str, commit_every: int, progress: bool,
                      stop_after: int | None) -> None:
    """Embed `todo` and commit every `commit_every` images; SIGINT/SIGTERM commit and raise Interrupted."""
    shas, paths = list(todo), list(todo.values())
    stop = {"signal": None}

    def on_signal(signum, _frame):
        stop["signal"] = signum

    handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    buf_sha: list[str] = []
    buf_feat: list[np.ndarray] = []
    buf_fail: dict[str, str] = {}
    done = 0

    def commit() -> None:
        feats = np.concatenate(buf_feat) if buf_feat else np.empty((0, bb.dim), np.float32)
        partial.commit(buf_sha, feats, buf_fail, dtype)
        buf_sha.clear(), buf_feat.clear(), buf_fail.clear()

    try:
        for idx, feats, errors in iter_embeddings(bb, paths, batch_size=batch_size, workers=workers, device=device,
                                                  progress=progress):
            buf_sha.extend(shas[i] for i in idx)
            buf_feat.append(feats)
            buf_fail.update({shas[i]: e for i, e in errors.items()})
            summary.extracted += len(idx)
            done += len(idx) + len(errors)
            if len(buf_sha) + len(buf_fail) >= commit_every:
                commit()
            if stop["signal"] is not None or (stop_after is not None and done >= stop_after):
                commit()
                raise Interrupted(f"interrupted: {len(partial.where)} embeddings committed in {partial.dir}; "
                                  "re-run the same command to resume")
        commit()
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)


def assemble_shards(*, out: str, num_shards: int) -> Summary:
    """Merge finished shard stores into `out` (streamed, atomic). Refuses missing shards or mixed backbones."""
    t0 = time.time()
    shards = [shard_path(out, i, num_shards) for i in range(num_shards)]
    missing = [str(s) for s in shards if not s.exists()]
    if missing:
        raise UserError(f"{out}: {len(missing)} of {num_shards} shards not finished ({missing[0]}...); "
                        "run the missing --shard-index values, then assemble again")
    parts = [read_store(s, features=False) for s in shards]
    fp = parts[0].fingerprint
    for s, p in zip(shards, parts):
        if p.fingerprint != fp or p.class_names != parts[0].class_names:
            raise UserError(f"{s}: made with another backbone or class list ({describe_mismatch(fp, p.fingerprint)}); "
                            "re-extract that shard with the same settings")
    rows: list[Row] = []
    where: dict[str, tuple[Path, int]] = {}
    skipped: set[tuple[str, str]] = set()
    conflicts: list[tuple[str, str]] = []
    for s, p in zip(shards, parts):
        groups = p.groups or [None] * len(p)
        rows += [Row(path, int(lab), sha, g or None) for path, lab, sha, g in zip(p.paths, p.labels, p.sha256, groups)]
        where.update({sha: (s, i) for i, sha in enumerate(p.sha256)})
        skipped.update(p.skipped)
        conflicts += p.conflicts
    rows.sort(key=lambda r: r.path)
    import h5py
    with h5py.File(shards[0], "r") as f:
        attrs = {k: f.attrs[k] for k in f.attrs if k not in ("shard", "complete", "created", "schema_version")}
    with StoreLock(out):
        write_store(out, rows=rows, where=where, dim=fp["dim"], dtype=str(attrs.get("feature_dtype", "float32")),
                    attrs=attrs, skipped=sorted(skipped), conflicts=conflicts)
    return Summary(out=str(out), reused=len(rows), rows=len(rows), skipped=sorted(skipped), conflicts=conflicts,
                   seconds=time.time() - t0)
