"""Read images: content hashes, and robust decoding to upright RGB within a stated memory bound.

Every problem with one image is a short reason (a `ValueError` from `decode`, a string from `hash_items`),
never a crash: a bad file in a million must not stop an extraction.

Memory bound: an image is decoded only when width x height <= MAX_PIXELS (40 MP); peak memory for one
image is then below ~10 bytes per pixel (the file's bytes, the RGB pixels, PIL's buffer for non-JPEG formats,
the resize's uint8 channels_last copy), i.e. about 400 MiB, whatever the file claims, and one such image per
decode thread. Aspect-ratio bombs (60000 x 2) are bounded by `resize_crop`.
"""
from __future__ import annotations

import hashlib
import os
import stat
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from features.input.sources import Item
from features.text import safe_text

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
        hit = known.get(safe_text(item.path))  # the store spells a non-UTF-8 name with \x escapes
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
        top = float(np.nanmax(a)) if a.size else 0.0
        if im.mode == "F" and top <= 1.0:
            peak = 1.0  # float images (scientific and HDR exports) hold 0..1, not 0..255
        else:
            peak = 65535.0 if im.mode.startswith("I;16") or top > 255 else 255.0
        a = np.clip(np.nan_to_num(a) * (255.0 / peak), 0, 255).round().astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if im.mode == "P" and "transparency" in im.info or im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


# libjpeg warnings that lose no pixel data (stray bytes between markers, odd but harmless headers): decoded anyway.
# Every other warning (premature end of data, a bad Huffman code, a missing restart marker) means libjpeg filled
# part of the picture with guessed values, so the file is refused.
_HARMLESS_JPEG_WARNINGS = ("extraneous bytes before marker", "Invalid SOS parameters for sequential JPEG",
                           "Unknown JFIF revision", "Warning: unknown JFIF revision")

# EXIF orientation -> the (3, H, W) tensor that shows the picture upright (PIL's ImageOps.exif_transpose, tested
# equal), on either device: the CPU recipe and features/models/gpu_jpeg.py turn pictures with this one table.
ORIENT = {2: lambda x: x.flip(2), 3: lambda x: x.flip(1, 2), 4: lambda x: x.flip(1), 5: lambda x: x.transpose(1, 2),
          6: lambda x: x.rot90(-1, (1, 2)), 7: lambda x: x.flip(1, 2).transpose(1, 2), 8: lambda x: x.rot90(1, (1, 2))}


def upright(x, orientation: int):
    """(3, H, W) tensor as stored -> as its EXIF orientation tag says to show it."""
    return ORIENT[orientation](x) if orientation in ORIENT else x


def strict_jpeg(data: bytes, **scaling) -> np.ndarray:
    """A baseline or progressive RGB/grey JPEG -> (H, W, 3) uint8 through libjpeg-turbo (simplejpeg: releases the
    GIL), chroma upsampled by replication (fastupsample: nvJPEG's pixels exactly, measured; the default
    triangular filter moves chroma edges by up to 64 levels against it). Decoded strictly: a file libjpeg finds
    damaged (cut short, with or without an end marker appended, zero-filled, garbled entropy data) raises
    ValueError instead of being embedded with grey or garbage filled in. `scaling` (min_factor=8) decodes at 1/8
    size: every entropy-coded bit is still read, so damage is found at a third less work than a full decode."""
    import simplejpeg
    try:
        return simplejpeg.decode_jpeg(data, colorspace="RGB", fastupsample=True, strict=True, **scaling)
    except ValueError as e:
        if not any(w in str(e) for w in _HARMLESS_JPEG_WARNINGS):
            raise ValueError(f"damaged JPEG ({str(e).strip()})") from None
        return simplejpeg.decode_jpeg(data, colorspace="RGB", fastupsample=True, strict=False, **scaling)


def jpeg_pixels(data: bytes):
    """JPEG bytes -> the CPU recipe's pixels as stored (before EXIF orientation): (3, H, W) uint8 tensor."""
    import torch  # here, not at the top: train-head imports this module and must not pay for torch
    return torch.from_numpy(strict_jpeg(data)).permute(2, 0, 1)


# JPEGs that nvJPEG decodes to exactly the pixels of strict_jpeg (benchmarks/gpu_check.py compares them on the
# GPU): sequential (not progressive) YCbCr or grey with these chroma subsamplings; every other JPEG stays on the CPU.
GPU_JPEG_SUBSAMPLING = ("444", "422", "420", "Gray")


@dataclass(frozen=True)
class JpegBytes:
    """A validated JPEG left for the GPU to decode: its bytes, EXIF orientation (1 = upright), width x height, and
    its kind (chroma subsampling and whether it is turned) for features/models/gpu_jpeg.py's checks."""
    data: bytearray  # writable: torch.frombuffer shares it without a copy
    orientation: int
    pixels: int
    kind: str = ""  # '420', '422 turned', 'Gray', ...


def _gpu_subsampling(data: bytes) -> str | None:
    """The chroma subsampling of a JPEG the GPU decodes to the CPU's pixels (GPU_JPEG_SUBSAMPLING), else None."""
    import simplejpeg
    try:
        _, _, colorspace, subsampling = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    return subsampling if colorspace in ("YCbCr", "Gray") and subsampling in GPU_JPEG_SUBSAMPLING else None


def decode_tensor(path: str, defer_jpeg: bool = False):
    """File -> upright RGB uint8 torch tensor (3, H, W), fully decoded (no DCT-domain draft scaling: an exported
    model sees what its user decodes). RGB and grey JPEG through libjpeg-turbo (simplejpeg), strictly; every
    other format through PIL. Raises ValueError with a short reason on any failure. `defer_jpeg`: a JPEG the GPU
    decodes to the same pixels (GPU_JPEG_SUBSAMPLING, sequential) is validated as strictly and returned as
    JpegBytes instead, for features/models/gpu_jpeg.py."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO or a device named x.png would block or never end
            raise ValueError("not a regular file (a pipe, device or socket)")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:  # reads the header only
                if im.width * im.height > MAX_PIXELS:
                    raise ValueError(f"too large: {im.width}x{im.height} pixels exceeds the limit of {MAX_PIXELS:,} "
                                     "(a decompression bomb, or downscale it first)")
                if im.format == "JPEG" and im.mode in ("RGB", "L"):
                    orientation = im.getexif().get(0x0112, 1)
                    sequential = not (im.info.get("progressive") or im.info.get("progression"))
                    pixels = im.width * im.height
                    rgb = None
                else:
                    if getattr(im, "n_frames", 1) > 1:
                        im.seek(0)  # animated: first frame
                    im.load()
                    rgb = np.array(_to_rgb(ImageOps.exif_transpose(im)), dtype=np.uint8)  # (H, W, 3), writable
            if rgb is not None:
                import torch  # here, not at the top: train-head imports this module and must not pay for torch
                return torch.from_numpy(rgb).permute(2, 0, 1)  # (3, H, W), a view
            with open(path, "rb") as f:
                data = f.read()
            kind = _gpu_subsampling(data) if defer_jpeg and sequential else None
            if kind:
                strict_jpeg(data, min_factor=8, min_height=1, min_width=1)  # raises as the full decode would
                return JpegBytes(bytearray(data), orientation, pixels, kind + (" turned" if orientation != 1 else ""))
            return upright(jpeg_pixels(data), orientation)  # (3, H, W)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ValueError(f"decompression bomb: {e}") from None
    except Image.UnidentifiedImageError:
        bits = jpeg_precision(path)
        if bits not in (None, 8):
            raise ValueError(f"a {bits}-bit JPEG (imgsent decodes 8-bit JPEGs); convert it to 8 bits or PNG") from None
        raise ValueError("not an image PIL can read (wrong extension or corrupt file)") from None
    except (OSError, SyntaxError, EOFError) as e:  # truncated data, unreadable file, broken headers
        raise ValueError(f"cannot decode: {e}") from None


def jpeg_precision(path: str) -> int | None:
    """The sample precision of a JPEG's frame header (8; 12 and 16 exist), or None when it is no JPEG or none is
    found in its first 64 KiB."""
    try:
        with open(path, "rb") as f:
            data = f.read(1 << 16)
    except OSError:
        return None
    i = 2 if data[:2] == b"\xff\xd8" else len(data)
    while i + 4 < len(data) and data[i] == 0xFF:
        marker, size = data[i + 1], int.from_bytes(data[i + 2:i + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # a start-of-frame: precision comes first
            return data[i + 4] if i + 4 < len(data) else None
        i += 2 + size
    return None


def decode(path: str) -> np.ndarray:
    """File -> upright RGB uint8 array (H, W, 3) (what `decode_tensor` decodes, for PIL and OpenCV users)."""
    return decode_tensor(path).permute(1, 2, 0).contiguous().numpy()
