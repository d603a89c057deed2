"""What an extract run will do, decided before any image is decoded: which files to hash, which rows of the old
store and of committed chunks to reuse, which images to embed, and the summary line the run reports.
Shards split the images by content hash (`shard_of`), so a re-run or a resume gives every image the same shard.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from features.text import plural, safe_text
from features.errors import UserError, short_reason
from features.models.faces import NO_FACE, FaceSpec
from features.input.images import hash_items
from features.input.sources import Source
from features.storage.partial import Partial, Where
from features.storage.store import Store, damaged_rows, describe_mismatch, read_store, store_fingerprint


@dataclass
class Summary:
    out: str
    backbone: str = ""  # named in the line: `extract` takes --backbone, not params.yaml's list
    reused: int = 0
    extracted: int = 0
    removed: int = 0
    damaged: int = 0  # rows of the old store that failed their checksum and were embedded again
    skipped: list[tuple[str, str]] = field(default_factory=list)
    conflicts: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    embed_seconds: float = 0.0  # decode + forward only
    rows: int = 0
    hashed: int = 0  # files read to hash them (the others were unchanged since the last run)
    unchanged: bool = False  # the store already held exactly this: not rewritten
    face_rows: int | None = None  # face mode: rows (one per face crop) in the store
    face_fallback: str | None = None  # face mode: what happened to an image without a face (skip | whole)
    face_capped: int = 0  # face mode `all`: images with FaceSpec.max_faces crops (more faces may be there)
    max_faces: int = 0
    seen: int | None = None  # files and unread folders found under the root: rows + skipped (a conflict is a row)
    labelled: int | None = None  # rows with a label (None: not counted)
    unused_classes: list[str] = field(default_factory=list)  # --classes names that no image carries

    def line(self) -> str:
        rate = f", {self.extracted / self.embed_seconds:.1f} img/s embedding" if self.extracted and self.embed_seconds > 0 else ""
        dmg = f", {self.damaged} damaged rows re-embedded" if self.damaged else ""
        same = "; store unchanged, not rewritten" if self.unchanged else ""
        faces = ""
        if self.face_rows is not None:
            noface = sum(1 for _, why in self.skipped if why == NO_FACE)
            faces = (f" -> {self.face_rows} rows: face crops, and the whole image where no face was found "
                     "(--faces-fallback whole)" if self.face_fallback == "whole" else
                     f" -> {plural(self.face_rows, 'face crop')} ({plural(noface, 'image')} without a face skipped)")
            if self.face_capped:
                faces += (f" [{self.face_capped} images reached the limit of {self.max_faces} faces: their "
                          f"{self.max_faces} largest were kept]")
        bb = f" ({self.backbone})" if self.backbone else ""
        return (f"{self.out}{bb}: {plural(self.rows, 'image')}{faces} ({self.reused} reused, {self.extracted} extracted, {self.removed} removed, "
                f"{len(self.skipped)} skipped, {len(self.conflicts)} label conflicts{dmg}; {self.hashed} files hashed"
                f"{same}) in {self.seconds:.1f} s{rate}" + (f"; {self.seen} files seen" if self.seen is not None else "")
                + ("; stored unlabelled: no class sub-folders or label column (fine for predict and suggest; to "
                   "train, pass the folder that holds one sub-folder per class)" if self.labelled == 0 and self.rows
                   else "")
                + (f"; --classes {', '.join(self.unused_classes)}: no image carries "
                   + ("it, so it is no class" if len(self.unused_classes) == 1 else "them, so they are no classes")
                   + " of the store (a typo?)" if self.unused_classes else ""))

    def detail_lines(self, shown: int = 20) -> list[str]:
        """The lines printed before the summary: the first skipped images and label conflicts with their reasons,
        and the skips counted by reason (the store lists them all). Non-UTF-8 names get \\x escapes, as stored."""
        lines = [safe_text(f"skipped {path}: {why}") for path, why in self.skipped[:shown]]
        if len(self.skipped) > shown:
            lines.append(f"... {len(self.skipped) - shown} more skipped; the store lists them all (skipped_paths)")
        if self.skipped:
            why = Counter(short_reason(r) for _, r in self.skipped).most_common()
            lines.append(f"skipped {len(self.skipped)}: " + "; ".join(f"{n} x {r}" for r, n in why))
        return lines + [safe_text(f"label conflict {path}: {why}") for path, why in self.conflicts[:shown]]


@dataclass
class Plan:
    """What a run will hold, image by image, and what it must embed; and what hashing the files found."""
    shas: list[str] = field(default_factory=list)  # one per row, in row order
    labels: list[int] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    groups: list[str | None] = field(default_factory=list)
    stats: list[tuple[int, int, int]] = field(default_factory=list)  # (size, mtime_ns, inode) when hashed
    todo: dict[str, str] = field(default_factory=dict)  # sha -> abspath to embed (first path wins for copies)
    hashed: int = 0  # files read to hash them (the others were unchanged since the last run)
    reused: int = 0  # rows whose features are reused
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, why) files that could not be hashed
    conflicts: list[tuple[str, str]] = field(default_factory=list)  # identical images under two labels


@dataclass
class Reusable:
    """What an existing store offers a run: its rows by key (sha256, or sha256:face), their face boxes, the store's
    records (None: nothing to reuse) and how many of its rows failed their checksum."""
    where: Where = field(default_factory=dict)
    boxes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    old: Store | None = None
    damaged: int = 0


def shard_of(sha: str, num_shards: int) -> int:
    return int(sha[:15], 16) % num_shards


def shard_path(out: str | Path, index: int, num_shards: int) -> Path:
    out = Path(out)
    return out.with_name(f"{out.stem}.shard-{index:05d}-of-{num_shards:05d}{out.suffix}")


def images_in(where: Where) -> set[str]:
    """Face mode: the images (sha256) that have rows, from keys '<sha256>:<face index>'."""
    return {k.rsplit(":", 1)[0] for k in where}


def store_rows(plan: Plan, where: Where, partial: Partial, spec: FaceSpec | None
               ) -> tuple[list[int], list[str], list[int] | None]:
    """The store's rows: (image index in the plan per row, row key, face index per row or None)."""
    ok = [i for i, s in enumerate(plan.shas) if s not in partial.failed]
    if spec is None:
        return ok, [plan.shas[i] for i in ok], None
    count = Counter(k.rsplit(":", 1)[0] for k in where)
    keep, keys, index = [], [], []
    for i in ok:
        for k in range(count[plan.shas[i]]):
            keep.append(i), keys.append(f"{plan.shas[i]}:{k}"), index.append(k)
    return keep, keys, index


def reusable_rows(target: Path, fp: dict, force: bool) -> Reusable:
    """The rows of the existing store at `target` that may be reused (same backbone, checksum intact)."""
    old_fp = store_fingerprint(target)
    if old_fp is not None and old_fp != fp and not force:
        raise UserError(f"{target} was made with other settings "
                        f"({describe_mismatch(fp, old_fp, ('this run', 'the store'))}); "
                        f"use another --out, the same settings, or --force to rebuild it")
    if old_fp != fp:
        return Reusable()
    try:
        old = read_store(target, features=False)
    except UserError:
        return Reusable()  # damaged beyond its features (metadata): rebuilt from the images
    bad = damaged_rows(target)
    if old.face_index is None:
        return Reusable({sha: (target, i) for i, sha in enumerate(old.sha256) if not bad[i]}, {}, old, int(bad.sum()))
    broken = {sha for sha, b in zip(old.sha256, bad) if b}  # an image's crops are reused all together or not at all
    keys = [f"{sha}:{k}" for sha, k in zip(old.sha256, old.face_index.tolist())]
    return Reusable({key: (target, i) for i, (key, sha) in enumerate(zip(keys, old.sha256)) if sha not in broken},
                    {key: tuple(int(v) for v in b) for key, b in zip(keys, old.face_boxes)}, old, int(bad.sum()))


def make_plan(source: Source, where: Where, partial: Partial, num_shards: int, shard_index: int, known: dict,
              stat_time_ns: int) -> Plan:
    """Hash every file (one unchanged since `known` by its stat), and list the rows and what is left to embed."""
    plan = Plan()
    first_label: dict[str, tuple[str, str | None]] = {}
    index = {c: i for i, c in enumerate(source.class_names)}
    for item, (sha, err, stat, how) in zip(source.items, hash_items(source.items, known=known,
                                                                    stat_time_ns=stat_time_ns)):
        plan.hashed += how in ("hashed", "racy")
        if err:
            plan.skipped.append((item.path, err))
            continue
        if num_shards > 1 and shard_of(sha, num_shards) != shard_index:
            continue
        first = first_label.setdefault(sha, (item.path, item.label))
        if first[1] != item.label:
            said = ["unlabelled" if label is None else repr(label) for label in (first[1], item.label)]
            plan.conflicts.append((item.path, f"identical to {first[0]} which is "
                                              f"{'' if first[1] is None else 'labelled '}{said[0]}, this one {said[1]}"))
        plan.shas.append(sha)
        plan.labels.append(index[item.label] if item.label is not None else -1)
        plan.paths.append(item.path)
        plan.groups.append(item.group)
        plan.stats.append(stat)
        if sha not in where and sha not in partial.failed:
            plan.todo.setdefault(sha, item.abspath)
    plan.reused = sum(1 for s in plan.shas if s in where)
    return plan
