"""Find the images to embed: an ImageFolder directory, a flat folder (unlabelled) or a CSV manifest.

Every row or file that is refused becomes a `(path, reason)` record, never a silent omission and never an
exception: one bad line in a million must not stop an extraction, and the user sees how many and why.
"""
from __future__ import annotations

import csv
import difflib
import io
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from features.errors import UserError, short_reason
from features.input.files import IMAGE_EXTENSIONS, is_hidden, unsupported, walk_images
from features.text import safe_text

MAX_MANIFEST_BYTES = 1 << 30  # a manifest is read whole: 1 GiB is ~10 million rows


@dataclass(frozen=True)
class Item:
    path: str  # as stored: relative to the source root when inside it, else absolute
    abspath: str
    label: str | None  # None = unlabelled
    group: str | None = None


@dataclass
class Source:
    root: str
    items: list[Item]
    class_names: list[str]
    problems: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    unused_classes: list[str] = field(default_factory=list)  # --classes names no usable image carries (a typo?)


def _is_our_output(d: Path) -> bool:
    """A model directory, an evaluation folder or a report that imgsent wrote (its marker files)."""
    return any((d / m).is_file() for m in ("model.json", "metrics.json", "summary.json"))


def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _checked_classes(classes: list[str] | None) -> list[str] | None:
    """--classes stripped ('happy, sad': two classes); an empty or repeated name is refused (a store's are distinct)."""
    if isinstance(classes, str):  # the Python API: 'happy,sad' would be read as the classes 'h', 'a', 'p', ...
        raise UserError(f"classes={classes!r}: expected a list of class names; pass {[c.strip() for c in classes.split(',')]}")
    names = None if classes is None else [c.strip() for c in classes]
    bad = next((c for c in names or [] if not c or names.count(c) > 1), None)  # the first empty or repeated name
    if bad is not None:
        why = f"{bad!r} is listed twice" if bad else "an empty class name"
        raise UserError(f"--classes {','.join(classes)!r}: {why}; list each class once, comma-separated: happy,sad")
    return names


def discover(images: str | os.PathLike, *, classes: list[str] | None = None, allow_outside: bool = False) -> Source:
    """ImageFolder (one sub-folder per class, sorted), a flat folder (unlabelled), or a `path[,label][,group]` CSV."""
    src = Path(images)
    classes = _checked_classes(classes)
    if not src.exists():
        raise UserError(f"{src}: no such file or folder; pass an ImageFolder directory or a CSV manifest with header path,label")
    if src.is_file():
        if src.suffix.lower() != ".csv":
            raise UserError(f"{src}: expected a folder of images or a .csv manifest with header path,label")
        source = _from_manifest(src, classes=classes, allow_outside=allow_outside)
    else:
        source = _from_folder(src, classes=classes)
    # A class without a usable image is no class: trained on, it would be averaged into every macro score as F1 0.
    # Its images' problems say why; a --classes name no image carries is said in the summary.
    used = {it.label for it in source.items}
    source.unused_classes = [c for c in classes or () if c not in used]
    source.class_names = [c for c in source.class_names if c in used]
    if not source.items:
        if source.problems:
            why = Counter(short_reason(r) for _, r in source.problems).most_common(3)
            raise UserError(f"{src}: no usable images: {len(source.problems)} refused "
                            f"({'; '.join(f'{n} x {r}' for r, n in why)}); first: {source.problems[0][0]}: "
                            f"{source.problems[0][1]}")
        raise UserError(f"{src}: no images found (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))}); "
                        "put images in one sub-folder per class")
    return source


def _from_folder(root: Path, *, classes: list[str] | None) -> Source:
    root = root.resolve()
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not is_hidden(p.name))
    items: list[Item] = []
    problems: list[tuple[str, str]] = []
    for d in [d for d in subdirs if _is_our_output(d)]:  # --out model/ written next to the class folders
        problems.append((_rel(d, root) + "/", "an imgsent output folder (model, evaluation or report), not a class"))
        subdirs.remove(d)
    if subdirs:
        # a class is named as it is stored: a folder name that is not UTF-8 (an old zip) gets \x escapes
        names = classes or [safe_text(d.name) for d in subdirs]
        for d in subdirs:
            found, other, unread = walk_images(d)
            problems += [(_rel(p, root), unsupported(p)) for p in other]
            problems += [(_rel(p, root) + "/", why) for p, why in unread]
            label = safe_text(d.name)
            for p in found:
                if label not in names:
                    problems.append((_rel(p, root), f"unknown label {label!r} (classes: {', '.join(names)})"))
                else:
                    items.append(Item(_rel(p, root), str(p), label))
        # A class folder without images (created, not yet filled) is said here; discover drops its class
        used = {it.label for it in items}
        for d in subdirs:
            if safe_text(d.name) in names and safe_text(d.name) not in used:
                problems.append((_rel(d, root) + "/", "empty class folder: no images, so no class; fill it or "
                                                       "remove it"))
        # Loose images next to class folders are unlabelled; keep them so predict/extract see them.
        for p in sorted(root.iterdir()):
            if p.is_file() and not is_hidden(p.name) and p.suffix.lower() in IMAGE_EXTENSIONS:
                items.append(Item(_rel(p, root), str(p), None))
    else:
        names = list(classes or [])
        found, other, unread = walk_images(root)
        items = [Item(_rel(p, root), str(p), None) for p in found]
        problems += [(_rel(p, root), unsupported(p)) for p in other]
        problems += [(_rel(p, root) + "/", why) for p, why in unread]
    return Source(str(root), items, list(names), problems)


def _read_manifest(csv_path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """Header and (line, fields) rows; encoding and quoting errors are one line naming the place."""
    if csv_path.stat().st_size > MAX_MANIFEST_BYTES:
        raise UserError(f"{csv_path}: manifest larger than {MAX_MANIFEST_BYTES >> 20} MiB; split it into several")
    raw = csv_path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise UserError(f"{csv_path}: not UTF-8 text (byte 0x{raw[e.start]:02x} on line {line}); "
                        "re-save the manifest as UTF-8") from None
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    rows: list[tuple[int, list[str]]] = []
    try:
        header = [h.strip() for h in next(reader, [])]
        for fields in reader:
            if fields:
                rows.append((reader.line_num, fields))
    except csv.Error as e:
        raise UserError(f"{csv_path}: line {reader.line_num}: {e} (an unclosed quote?); fix the quoting") from None
    return header, rows


MANIFEST_COLUMNS = ("path", "label", "group")


def _from_manifest(csv_path: Path, *, classes: list[str] | None, allow_outside: bool) -> Source:
    root = csv_path.resolve().parent
    header, rows = _read_manifest(csv_path)
    if "path" not in header:
        raise UserError(f"{csv_path}: header must contain 'path' (and 'label' for training; found: "
                        f"{','.join(header) or 'nothing'})")
    if len(set(header)) != len(header):
        raise UserError(f"{csv_path}: header repeats a column ({','.join(header)}); name each column once")
    for h in header:  # 'path,lable' was read as an unlabelled manifest, and only train-head complained
        if h not in MANIFEST_COLUMNS:
            close = difflib.get_close_matches(h, MANIFEST_COLUMNS, n=1, cutoff=0.5)
            raise UserError(f"{csv_path}: unknown column {h!r} in the header"
                            f"{f' (did you mean {close[0]!r}?)' if close else ''}; the columns are "
                            f"{', '.join(MANIFEST_COLUMNS)}")
    col = {h: i for i, h in enumerate(header)}
    has_labels, has_groups = "label" in col, "group" in col
    items: list[Item] = []
    problems: list[tuple[str, str]] = []
    seen: dict[str, tuple[int, str | None]] = {}
    good: list[tuple[int, str, Path, str | None, str | None]] = []
    for line, fields in rows:
        raw = fields[col["path"]] if len(fields) > col["path"] else ""
        if raw != raw.strip() and not (root / raw).exists():  # stray spaces around the name, unless the file has them
            raw = raw.strip()
        where = raw or f"{csv_path.name}:{line}"
        if len(fields) != len(header):
            problems.append((where, f"line {line} has {len(fields)} fields, the header has {len(header)}; "
                                    "quote values that contain commas"))
            continue
        label = fields[col["label"]].strip() if has_labels else None
        if not raw:
            problems.append((where, f"empty path (line {line})"))
            continue
        if has_labels and not label:
            problems.append((raw, f"empty label (line {line}); label it, or list unlabelled images in a manifest "
                                  "without a label column"))
            continue
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", raw):  # normpath would make 'https:/host/x.png' of it
            problems.append((raw, f"a URL (line {line}); imgsent reads local files only and never downloads: "
                                  "download the images and list their paths"))
            continue
        p = Path(raw)
        full = Path(os.path.normpath(p if p.is_absolute() else root / p))
        if "\\" in raw and os.sep == "/" and not full.exists():
            problems.append((raw, f"no such file (line {line}); written with Windows separators? use / between "
                                  "folders, e.g. happy/a.png"))
            continue
        if not p.is_absolute() and root not in full.parents and not allow_outside:
            problems.append((raw, f"relative path climbs out of the manifest folder {root} with '..' (line {line}); "
                                  "write it as an absolute path or pass --allow-outside"))
            continue
        key = str(full)
        if key in seen:
            first_line, first_label = seen[key]
            why = "duplicate row" if first_label == label else f"conflicting duplicate row (label {label!r} vs {first_label!r})"
            problems.append((raw, f"{why}: line {line} repeats line {first_line}; the first is kept"))
            continue
        seen[key] = (line, label)
        group = (fields[col["group"]].strip() or None) if has_groups else None
        good.append((line, raw, full, label, group))
    names = classes or sorted({g[3] for g in good if g[3] is not None})
    for line, raw, full, label, group in good:
        if label is not None and label not in names:
            problems.append((raw, f"unknown label {label!r} (line {line}; classes: {', '.join(names)})"))
            continue
        if full.suffix.lower() not in IMAGE_EXTENSIONS:
            problems.append((raw, unsupported(full)))
            continue
        items.append(Item(_rel(full, root), str(full), label, group))
    return Source(str(root), items, list(names), problems)
