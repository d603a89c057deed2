"""Read images: content hashes, and robust decoding to upright RGB within a stated memory bound.

Every problem with one image is a short reason (a `ValueError` from `decode`, a string from `hash_items`),
never a crash: a bad file in a million must not stop an extraction.

Memory bound: an image is decoded only when width x height <= MAX_PIXELS (40 MP); peak memory for one
image is then below ~25 bytes per pixel (PIL's buffer, the RGB array and the float copy the resize needs),
i.e. about 1 GiB, whatever the file claims. Aspect-ratio bombs (60000 x 2) are bounded by `resize_crop`.
"""
from __future__ import annotations

import hashlib
import os
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image, ImageOps

from features.sources import Item

MAX_PIXELS = 40_000_000


# --------------------------------------------------------------------------- hashing

def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


Stat = tuple[int, int, int]  # (size, mtime_ns, inode) of a file when it was hashed
RACY_NS = 2_000_000_000  # a file modified this close to the hashing pass may change again within one mtime tick


def _hash_one(item: Item, known: dict[str, tuple[Stat, str]], trusted_before_ns: int
              ) -> tuple[str | None, str | None, Stat | None, str]:
    try:
        st = os.stat(item.abspath)
        stat = (st.st_size, st.st_mtime_ns, st.st_ino)
        if st.st_size == 0:
            return None, "empty file (0 bytes)", None, "error"
        hit = known.get(item.path)
        if hit is not None and hit[0] == stat:
            if stat[1] < trusted_before_ns:
                return hit[1], None, stat, "cached"  # unchanged since it was hashed: not read again
            return sha256_file(item.abspath), None, stat, "racy"
        return sha256_file(item.abspath), None, stat, "hashed"
    except OSError as e:  # missing, permission denied, symlink loop, a folder named like an image...
        return None, f"cannot read: {e.strerror or e}", None, "error"


def hash_items(items: list[Item], *, known: dict[str, tuple[Stat, str]] | None = None, stat_time_ns: int = 0,
               threads: int = 4) -> list[tuple[str | None, str | None, Stat | None, str]]:
    """(sha256, None, stat, how) or (None, reason, None, "error") per item, in order; how = hashed | cached | racy. hashlib releases the GIL, so threads
    help. `known` maps a stored path to the (stat, sha256) recorded by the pass that started at `stat_time_ns`:
    a file whose size, mtime and inode are unchanged is not read again, unless it was modified within RACY_NS
    before that pass (file systems stamp mtimes in ticks of several ms; git's "racy clean" problem)."""
    known = known or {}
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return list(pool.map(lambda it: _hash_one(it, known, stat_time_ns - RACY_NS), items, chunksize=64))


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


def decode(path: str) -> np.ndarray:
    """File -> upright RGB uint8 array (H, W, 3), fully decoded as PIL does (no JPEG draft scaling: exported
    models see what users decode). Raises ValueError with a short reason on any failure."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if im.width * im.height > MAX_PIXELS:
                    raise ValueError(f"too large: {im.width}x{im.height} pixels exceeds the limit of {MAX_PIXELS:,} "
                                     "(a decompression bomb, or downscale it first)")
                if getattr(im, "n_frames", 1) > 1:
                    im.seek(0)  # animated: first frame
                im.load()
                im = ImageOps.exif_transpose(im)
                rgb = _to_rgb(im)
                return np.array(rgb, dtype=np.uint8)  # (H, W, 3), writable
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ValueError(f"decompression bomb: {e}") from None
    except Image.UnidentifiedImageError:
        raise ValueError("not an image PIL can read (wrong extension or corrupt file)") from None
    except (OSError, SyntaxError, EOFError) as e:  # truncated data, unreadable file, broken headers
        raise ValueError(f"cannot decode: {e}") from None
