"""Find labelled images (ImageFolder directory or CSV manifest), hash them, and decode them robustly.

Every problem with one image becomes a `(path, reason)` record, never an exception: a bad file
in a million must not stop an extraction.
"""
from __future__ import annotations

import csv
import hashlib
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from features.errors import UserError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


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


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def walk_images(folder: Path) -> list[Path]:
    """Image files below `folder`, sorted, hidden files and folders skipped, links to folders not followed."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
        for name in sorted(filenames):
            if not _is_hidden(name) and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                found.append(Path(dirpath) / name)
    return found


def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def discover(images: str | os.PathLike, *, classes: list[str] | None = None,
             allow_outside: bool = False) -> Source:
    """ImageFolder (one sub-folder per class, sorted), a flat folder (unlabelled), or a `path,label[,group]` CSV."""
    src = Path(images)
    if not src.exists():
        raise UserError(f"{src}: no such file or folder; pass an ImageFolder directory or a CSV manifest with header path,label")
    if src.is_file():
        if src.suffix.lower() != ".csv":
            raise UserError(f"{src}: expected a folder of images or a .csv manifest with header path,label")
        source = _from_manifest(src, classes=classes, allow_outside=allow_outside)
    else:
        source = _from_folder(src, classes=classes)
    if not source.items:
        raise UserError(f"{src}: no images found (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))}); "
                        "put images in one sub-folder per class")
    return source


def _from_folder(root: Path, *, classes: list[str] | None) -> Source:
    root = root.resolve()
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not _is_hidden(p.name))
    items: list[Item] = []
    problems: list[tuple[str, str]] = []
    if subdirs:
        names = classes or [d.name for d in subdirs]
        for d in subdirs:
            label = d.name
            for p in walk_images(d):
                if label not in names:
                    problems.append((_rel(p, root), f"unknown label {label!r} (classes: {', '.join(names)})"))
                    continue
                items.append(Item(_rel(p, root), str(p), label))
    else:
        names = list(classes or [])
        items = [Item(_rel(p, root), str(p), None) for p in walk_images(root)]
    # Loose files next to class folders are unlabelled; keep them so predict/extract see them.
    if subdirs:
        for p in sorted(root.iterdir()):
            if p.is_file() and not _is_hidden(p.name) and p.suffix.lower() in IMAGE_EXTENSIONS:
                items.append(Item(_rel(p, root), str(p), None))
    return Source(str(root), items, list(names), problems)


def _from_manifest(csv_path: Path, *, classes: list[str] | None, allow_outside: bool) -> Source:
    root = csv_path.resolve().parent
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        if "path" not in header or "label" not in header:
            raise UserError(f"{csv_path}: header must contain 'path' and 'label' (found: {','.join(header) or 'nothing'})")
        rows = list(reader)
    has_groups = "group" in header
    items: list[Item] = []
    problems: list[tuple[str, str]] = []
    seen: dict[str, tuple[int, str]] = {}
    labels_seen = sorted({(r.get("label") or "").strip() for r in rows} - {""})
    names = classes or labels_seen
    for line, row in enumerate(rows, start=2):
        raw = (row.get("path") or "").strip()
        label = (row.get("label") or "").strip() or None
        if not raw:
            problems.append((f"{csv_path.name}:{line}", "empty path"))
            continue
        p = Path(raw)
        full = Path(os.path.normpath(p if p.is_absolute() else root / p))
        inside = full == root or root in full.parents
        if not inside and not allow_outside:
            problems.append((raw, f"path escapes the manifest folder {root} (line {line}); pass --allow-outside to accept it"))
            continue
        key = str(full)
        if key in seen:
            first_line, first_label = seen[key]
            why = "duplicate row" if first_label == label else f"conflicting duplicate row (label {label!r} vs {first_label!r})"
            problems.append((raw, f"{why}: line {line} repeats line {first_line}; the first is kept"))
            continue
        seen[key] = (line, label)
        if label is not None and label not in names:
            problems.append((raw, f"unknown label {label!r} (line {line}; classes: {', '.join(names)})"))
            continue
        group = (row.get("group") or "").strip() or None if has_groups else None
        items.append(Item(_rel(full, root), key, label, group))
    return Source(str(root), items, list(names), problems)


# --------------------------------------------------------------------------- hashing

def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _hash_one(item: Item) -> tuple[str | None, str | None]:
    try:
        if os.path.getsize(item.abspath) == 0:
            return None, "empty file (0 bytes)"
        return sha256_file(item.abspath), None
    except OSError as e:  # missing, permission denied, symlink loop, a folder named like an image...
        return None, f"cannot read: {e.strerror or e}"


def hash_items(items: list[Item], *, threads: int = 4) -> list[tuple[str | None, str | None]]:
    """(sha256, None) or (None, reason) per item, in order. hashlib releases the GIL, so threads help."""
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return list(pool.map(_hash_one, items, chunksize=64))


# --------------------------------------------------------------------------- decoding

def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # PIL's convert('RGB') clips 16-bit values at 255; rescale to 8 bits instead. (H, W)
        a = np.asarray(im, dtype=np.float64)
        peak = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        a = np.clip(a * (255.0 / peak), 0, 255).round().astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if im.mode == "P" and "transparency" in im.info or im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def decode(path: str, *, draft: int | None = None) -> np.ndarray:
    """File -> upright RGB uint8 array (H, W, 3). Raises ValueError with a short reason on any failure.

    `draft`: for JPEGs, let libjpeg decode at a reduced scale (1/2..1/8) that stays >= draft pixels
    on the short side; this is where most of the decode time of large photos goes.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if im.width * im.height > (Image.MAX_IMAGE_PIXELS or float("inf")):
                    raise ValueError(f"decompression bomb: {im.width}x{im.height} pixels exceeds PIL's limit "
                                     f"{Image.MAX_IMAGE_PIXELS}")
                if getattr(im, "n_frames", 1) > 1:
                    im.seek(0)  # animated: first frame
                if draft and im.format == "JPEG":
                    im.draft(im.mode, (draft, draft))  # picks the largest 1/2^k scale still >= draft on both sides
                im.load()
                im = ImageOps.exif_transpose(im)
                rgb = _to_rgb(im)
                return np.asarray(rgb, dtype=np.uint8).copy()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ValueError(f"decompression bomb: {e}") from None
    except Image.UnidentifiedImageError:
        raise ValueError("not an image PIL can read (wrong extension or corrupt file)") from None
    except (OSError, SyntaxError, EOFError) as e:  # truncated data, unreadable file, broken headers
        raise ValueError(f"cannot decode: {e}") from None
