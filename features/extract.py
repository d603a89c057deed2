"""Stage one: images -> frozen backbone -> HDF5 feature store, incremental by image content.

    plan:  discover -> hash (sha256 of bytes; a file whose size, mtime and inode the store recorded is not read
           again) -> what the old store / committed chunks already hold
    embed: decode + resize + forward in batches (features/models/embed.py), committing chunks as it goes
    write: assemble every row into a new store, renamed over the old one; a store that would come out the same
           is left alone (a no-op re-run reads no image and writes nothing)

Killed at any point, a re-run of the same command resumes from the last committed chunk. Rows of the old
store whose checksum fails are embedded again, never reused.

Face mode (--faces largest|all, features/models/faces.py): the unit of work is still the image, but an image gives
one row per face crop, keyed "<sha256>:<face index>" in the partial chunks, with its crop box; an image with no
face is skipped with the reason "no face found" (or embedded whole under --faces-fallback whole).
"""
from __future__ import annotations

import json
import signal
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

from features.storage.atomic import OutputLock, check_output
from features.models.backbones import Backbone, fingerprint_key, load_backbone
from features.models.preprocess import Preprocess
from features.models.embed import iter_embeddings, iter_face_embeddings, resolve_device
from features.models.engine import ENGINES, cached_engine
from features.errors import UserError, short_reason
from features.models.faces import NO_FACE, FaceSpec, with_faces, without_faces
from features.storage.partial import Partial, gather_blocks
from features.input.prefetch import resolve_workers
from features.input.sources import Source, discover
from features.storage.statcache import read_stat_cache, write_stat_cache
from features.storage.store import describe_mismatch, is_store, store_fingerprint
from features.storage.write import StoreContent, unchanged, write_store
from features.plan import Plan, Reusable, Summary, images_in, make_plan, reusable_rows, shard_path, store_rows
from features.text import safe_text, plural


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived; committed work is safe and the message says how to resume."""


def check_store_out(out: str | Path) -> Path:
    return check_output(out, folder=False, is_ours=is_store, what="feature store (.h5)")


def extract(*, images: str, out: str, backbone: str = "efficientnet_lite0", weights: str | None = None,
            batch_size: int = 32, workers: int | str = "auto", device: str = "auto", dtype: str = "float32",
            force: bool = False, classes: list[str] | None = None, allow_outside: bool = False,
            commit_every: int = 256, num_shards: int = 1, shard_index: int = 0, progress: bool = True,
            engine: str = "auto", faces: str = "off",
            faces_fallback: str = "skip", verify: bool = False) -> Summary:
    """Bring the store at `out` up to date with `images`. Returns the summary (skips included).
    `faces`: off | largest | all (features/models/faces.py); `faces_fallback`: skip | whole, for images without one.
    `verify`: read and hash every file instead of trusting the stat cache (size, mtime, inode), which cannot
    see a file rewritten in place with its mtime restored."""
    _check_args(dtype=dtype, batch_size=batch_size, commit_every=commit_every, engine=engine,
                num_shards=num_shards, shard_index=shard_index)
    workers = resolve_workers(workers)
    spec = FaceSpec.make(faces, faces_fallback)
    t0 = time.time()
    target = check_store_out(out if num_shards == 1 else shard_path(out, shard_index, num_shards))
    source = discover(images, classes=classes, allow_outside=allow_outside)
    dev = resolve_device(device, images=len(source.items))
    key = fingerprint_key(backbone, weights)
    if key is not None and spec is not None:
        key["faces"] = spec.to_dict()
    # the store's fingerprint when it recorded the same weights file, preprocessing and libraries (never for hub
    # weights, whose file only timm can find): then nothing to embed means no network to build
    fp = None if force or key is None else store_fingerprint(target, key=key)
    # stage lines for a person at a terminal (the seconds before the bar: imports, backbone, hashing); logs and
    # pipes get the summary line only
    say = ((lambda msg: print(f"{target}: {msg}", file=sys.stderr, flush=True)) if progress and sys.stderr.isatty()
           else (lambda msg: None))
    say(f"{plural(len(source.items), 'image')} found; on {dev}, {workers} decode threads")
    bb = None
    if fp is None:
        say(f"loading {backbone}")
        bb = load_backbone(backbone, weights=weights, device=dev)
        fp = with_faces(bb.fingerprint, spec)
    with OutputLock(target):
        # 1. what can be reused: the store's rows, its stat cache, an unfinished run's committed chunks
        reuse = reusable_rows(target, fp, force)
        known, known_since = ({}, 0) if verify else _stat_cache(target, reuse)
        partial = Partial(target, fp, force=force)
        if spec is not None and reuse.old is not None:  # the detector is deterministic: no face then, no face now
            partial.failed.update({sha: NO_FACE for sha in reuse.old.noface})
        where, boxes = {**reuse.where, **partial.where}, {**reuse.boxes, **partial.boxes}
        # 2. plan: hash the files (an unchanged one by its stat) and find what is new
        stat_time = time.time_ns()
        plan = make_plan(source, images_in(where) if spec else where, partial, num_shards, shard_index, known,
                         known_since)
        # 3. embed what is new, committing as it goes (a kill loses at most commit_every images)
        t_embed, extracted, model = time.time(), 0, None
        if plan.todo and bb is None:  # the cached export of this very fingerprint, else the network
            bb, model = _backbone_for(target, fp, spec, backbone=backbone, weights=weights, device=dev, engine=engine)
        if plan.todo:
            extracted = _embed_and_commit(bb, plan.todo, partial, batch_size=batch_size, workers=workers, device=dev,
                                          dtype=dtype, commit_every=commit_every, progress=progress,
                                          engine=engine, model=model, faces=spec)
        embed_seconds = time.time() - t_embed if plan.todo else 0.0
        where.update(partial.where)
        boxes.update(partial.boxes)
        skipped = list(source.problems) + plan.skipped + [(plan.paths[i], partial.failed[s])
                                                          for i, s in enumerate(plan.shas) if s in partial.failed]
        # 4. write: one row per image, or (face mode) per face crop, in image order; not rewritten when unchanged
        keep, keys, face_index = store_rows(plan, where, partial, spec)
        if not keep and skipped and num_shards == 1:
            raise _nothing_embedded(images, skipped, spec)
        content = _content(plan, keep, keys, face_index, boxes, partial, source, fp, spec, skipped, dtype=dtype,
                           weights=weights, num_shards=num_shards, shard_index=shard_index)
        same = reuse.old is not None and not extracted and not reuse.damaged and unchanged(target, content)
        digest = reuse.old.meta_sha256 if same else \
            write_store(target, content, blocks=gather_blocks(keys, where, fp["dim"]), dim=fp["dim"])
        write_stat_cache(target, meta_sha256=digest, stat_time_ns=stat_time, fingerprint_key=key,
                         file_stats=np.array([plan.stats[i] for i in keep], dtype=np.int64).reshape(-1, 3))
        partial.discard()
    kept = {safe_text(plan.paths[i]) for i in keep}  # as the store spells them
    faced = spec is not None and spec.mode == "all"
    return Summary(out=str(target), backbone=backbone, reused=plan.reused, extracted=extracted,
                   removed=sum(1 for p in (reuse.old.paths if reuse.old else []) if p not in kept),
                   damaged=reuse.damaged, skipped=skipped, conflicts=plan.conflicts, seconds=time.time() - t0,
                   embed_seconds=embed_seconds, rows=len(kept), hashed=plan.hashed, unchanged=same,
                   face_rows=len(keep) if spec is not None else None,
                   face_fallback=spec.fallback if spec is not None else None,
                   face_capped=sum(1 for n in Counter(plan.paths[i] for i in keep).values()
                                   if n >= spec.max_faces) if faced else 0,
                   max_faces=spec.max_faces if faced else 0,
                   seen=len(source.items) + len(source.problems) if num_shards == 1 else None,
                   labelled=sum(1 for i in keep if plan.labels[i] >= 0), unused_classes=source.unused_classes)


def _stat_cache(target: Path, reuse: Reusable) -> tuple[dict, int]:
    """(path -> ((size, mtime_ns, inode), sha256), the time of that pass) from the stat cache beside the store,
    or ({}, 0) when there is none to trust."""
    old = reuse.old
    cache = read_stat_cache(target, old.meta_sha256, len(old.paths)) if old is not None else None
    if cache is None:
        return {}, 0
    return {p: (tuple(int(v) for v in st), sha) for p, st, sha in zip(old.paths, cache[0], old.sha256)}, cache[1]


def _nothing_embedded(images: str, skipped: list[tuple[str, str]], spec: FaceSpec | None) -> UserError:
    """A 0-row store would only fail later, further from the cause: files skipped before embedding (empty, of an
    unknown type) count as much as those that failed in it."""
    why = Counter(short_reason(r) for _, r in skipped).most_common(3)
    hint = ("; use --faces-fallback whole to embed them whole, or --faces off" if spec is not None
            and spec.fallback == "skip" and any(r == NO_FACE for r, _ in why) else "")
    return UserError(f"{images}: none of {len({p for p, _ in skipped})} images could be embedded "
                     f"({'; '.join(f'{n} x {r}' for r, n in why)}){hint}")


def _check_args(*, dtype: str, batch_size: int, commit_every: int, engine: str, num_shards: int,
                shard_index: int) -> None:
    """The options, checked before anything is read."""
    if dtype not in ("float32", "float16"):
        raise UserError(f"--dtype {dtype}: expected float32 or float16")
    if batch_size < 1 or commit_every < 1:
        raise UserError(f"--batch-size {batch_size} / --commit-every {commit_every}: "
                        "need batch-size >= 1, commit-every >= 1")
    if engine not in ENGINES:
        raise UserError(f"--engine {engine}: expected one of {', '.join(ENGINES)}")
    if not 0 <= shard_index < num_shards:
        raise UserError(f"--shard-index {shard_index}: must be in 0..{num_shards - 1} for --num-shards {num_shards}")


def _backbone_for(target: Path, fp: dict, spec: FaceSpec | None, *, backbone: str, weights: str | None,
                  device: str, engine: str) -> tuple[Backbone, object | None]:
    """What embeds new images into a store whose fingerprint is known: on the CPU, the parity-checked ONNX export
    of exactly that fingerprint when one is cached (no network built); else the network, which must give the
    same fingerprint. -> (backbone, ready engine or None)."""
    model = cached_engine(without_faces(fp)) if engine != "torch" and device == "cpu" else None
    if model is not None:
        return Backbone(name=backbone, embedder=None, pre=Preprocess.from_json(json.dumps(fp["preprocess"])),
                        dim=int(fp["dim"]), weights_sha256=fp["weights_sha256"]), model
    bb = load_backbone(backbone, weights=weights, device=device)
    if with_faces(bb.fingerprint, spec) != fp:
        raise UserError(f"{target}: backbone {backbone} gives another fingerprint than the store "
                        f"records ({describe_mismatch(fp, bb.fingerprint, ('the store', 'the backbone'))}) although its weights file "
                        "looks unchanged; re-run with --force to rebuild the store")
    return bb, None


def _content(plan: Plan, keep: list[int], keys: list[str], face_index: list[int] | None, boxes: dict,
             partial: Partial, source: Source, fp: dict, spec: FaceSpec | None, skipped: list[tuple[str, str]], *,
             dtype: str, weights: str | None, num_shards: int, shard_index: int) -> StoreContent:
    """The new store's rows and records: one row per image, or (face mode) per face crop, in image order."""
    attrs = {"weights_path": str(Path(weights).resolve()) if weights else "", "feature_dtype": dtype}
    if num_shards > 1:
        attrs["shard"] = json.dumps({"index": shard_index, "count": num_shards})
    content = StoreContent(
        dtype=dtype, labels=np.array([plan.labels[i] for i in keep], dtype=np.int64),
        paths=[plan.paths[i] for i in keep], sha256=[plan.shas[i] for i in keep],
        groups=[plan.groups[i] for i in keep], class_names=source.class_names, fingerprint=fp, root=source.root,
        skipped=sorted(set(skipped)), conflicts=plan.conflicts, attrs=attrs)
    if spec is not None:  # face mode: one row per face, its crop box, and the images without a face
        content.face_index = np.array(face_index, np.int32)
        content.face_boxes = np.array([boxes[k] for k in keys], np.int32).reshape(-1, 4)
        content.noface = sorted({s for s in plan.shas if partial.failed.get(s) == NO_FACE})
    return content


def _embed_and_commit(bb: Backbone, todo: dict[str, str], partial: Partial, *, batch_size: int, workers: int,
                      device: str, dtype: str, commit_every: int, progress: bool, engine: str,
                      model=None, faces: FaceSpec | None = None) -> int:
    """Embed `todo` and commit every `commit_every` images; SIGINT/SIGTERM commit and raise Interrupted. Returns the
    images embedded. Face mode: the rows of an image are its crops, keyed '<sha256>:<face index>', committed with
    their boxes."""
    shas, paths = list(todo), list(todo.values())
    stop = {"signal": None}

    def on_signal(signum, _frame):
        stop["signal"] = signum

    handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    buf_sha: list[str] = []
    buf_feat: list[np.ndarray] = []
    buf_fail: dict[str, str] = {}
    buf_box: list[np.ndarray] = []
    extracted = 0

    def commit() -> None:
        feats = np.concatenate(buf_feat) if buf_feat else np.empty((0, bb.dim), np.float32)
        partial.commit(buf_sha, feats, buf_fail, dtype,
                       boxes=np.concatenate(buf_box) if faces is not None and buf_box else None)
        buf_sha.clear(), buf_feat.clear(), buf_fail.clear(), buf_box.clear()

    kw = dict(batch_size=batch_size, workers=workers, device=device, progress=progress, engine=engine, model=model)
    if faces is None:
        batches = ((idx, feats, None, errors) for idx, feats, errors in iter_embeddings(bb, paths, **kw))
    else:
        batches = iter_face_embeddings(bb, paths, faces, **kw)
    try:
        for idx, feats, boxes, errors in batches:
            if faces is None:
                buf_sha.extend(shas[i] for i in idx)
            else:  # rows of one image are consecutive: number them 0, 1, ... per image
                buf_sha.extend(f"{shas[i]}:{k}" for i, k in zip(idx, _ranks(idx)))
                buf_box.append(boxes)
            buf_feat.append(feats)
            buf_fail.update({shas[i]: e for i, e in errors.items()})
            extracted += len(set(idx))
            if len(buf_sha) + len(buf_fail) >= commit_every:
                commit()
            if stop["signal"] is not None:
                commit()
                raise Interrupted(f"interrupted: {len(partial.where)} embeddings committed in {partial.dir}; "
                                  "re-run the same command to resume")
        commit()
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    return extracted


def _ranks(idx: list[int]) -> list[int]:
    """0, 1, 2 ... within each run of equal consecutive values: [4, 4, 7, 9, 9, 9] -> [0, 1, 0, 0, 1, 2]."""
    out, prev, k = [], None, 0
    for i in idx:
        k = k + 1 if i == prev else 0
        out.append(k)
        prev = i
    return out
