"""Which files are images, and the walk that finds them below a folder: one rule for extract and predict."""
from __future__ import annotations

import os
from pathlib import Path

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".jfif", ".jpe", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
# .jfif / .jpe: how Chrome and Windows save some JPEGs (the decoder goes by the file's bytes, not its name)


def is_hidden(name: str) -> bool:
    return name.startswith(".")


OTHER_IMAGE_EXTENSIONS = {".svg", ".heic", ".heif", ".avif", ".jxl", ".jp2", ".psd", ".xcf", ".ico", ".icns", ".eps",
                          ".exr", ".hdr", ".raw", ".dng", ".cr2", ".cr3", ".nef", ".arw", ".orf", ".rw2"}  # not decoded


def unsupported(path: Path) -> str:
    """Why a file is skipped by its type: an image format imgsent does not decode gets the fix; anything else
    (notes.txt, Thumbs.db) is simply not an image."""
    ext = path.suffix.lower() or "(no extension)"
    if ext in OTHER_IMAGE_EXTENSIONS:
        return f"unsupported file type {ext} (imgsent decodes {', '.join(sorted(IMAGE_EXTENSIONS))}); convert it to PNG or JPEG"
    return f"not an image file ({ext})"


def walk_images(folder: Path) -> tuple[list[Path], list[Path], list[tuple[Path, str]]]:
    """(image files, other files, (folder, reason) for folders not read) below `folder`, sorted. Hidden files and
    folders are skipped; folder links are followed, each real folder read once (a link loop is reported); a
    folder that cannot be listed (permission, a path over PATH_MAX) is reported, not silently left out."""
    found, other, unread = [], [], []
    seen = {os.path.realpath(folder)}

    def cannot_list(e: OSError) -> None:
        unread.append((Path(e.filename), f"cannot list folder: {e.strerror or e}"))

    for dirpath, dirnames, filenames in os.walk(folder, onerror=cannot_list, followlinks=True):
        keep = []
        for d in sorted(x for x in dirnames if not is_hidden(x)):
            real = os.path.realpath(os.path.join(dirpath, d))
            if real in seen:
                unread.append((Path(dirpath) / d, f"folder link to {real}, which is already read (a loop or a "
                                                  "second link): not read again"))
            else:
                seen.add(real)
                keep.append(d)
        dirnames[:] = keep
        for name in sorted(filenames):
            if not is_hidden(name):
                p = Path(dirpath) / name
                (found if p.suffix.lower() in IMAGE_EXTENSIONS else other).append(p)
    return found, other, sorted(unread)
