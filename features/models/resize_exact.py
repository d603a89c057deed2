"""PyTorch's CPU uint8 antialiased resize, reproduced bit for bit on any device (the GPU has no uint8 kernel).

`resize_crop` on the CPU runs F.interpolate(uint8, antialias=True): per axis, PIL-style filter weights computed
in float64, rounded to int16 with the most precision bits that fit, then (bias + sum of weight * pixel) >> bits,
clamped to 0..255; width first, then height, each pass rounded to uint8 (ATen's UpSampleKernel.cpp). Here the
same int16 weights form a dense (n_in, n_out) matrix and each pass is a float64 matmul: every product and sum
is an integer below 2^31, exact in float64's 53 bits, so the result is the CPU's to the last bit (tested against
F.interpolate on random sizes, both filters, up- and downscaling). Only the output rows and columns the centre
crop keeps are computed.

    y = resize_crop_exact(x, resize=256, size=224, bicubic=True)   # x (n, C, H, W) uint8 on any device

Memory: one float64 copy of the input (8 bytes per pixel and channel: 46 MB for a 1600 x 1200 photo, 290 MB
for 12 MP) per call, which callers bound by the number of images they pass at once; and the weight matrices
of the 32 latest image sizes kept on the device (side x 224 x 8 bytes each: 2.9 MB for a 1600 px side, at
most 20 MB for the 40 MP limit).
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch


def _filter(t: np.ndarray, bicubic: bool) -> np.ndarray:
    """ATen's aa_filter on |t|: the triangle (bilinear) or Keys' cubic with a = -0.5 (bicubic), in the same
    operation order, so float64 rounding matches."""
    if bicubic:
        a = -0.5
        return np.where(t < 1.0, ((a + 2) * t - (a + 3)) * t * t + 1,
                        np.where(t < 2.0, ((a * t - 5 * a) * t + 8 * a) * t - 4 * a, 0.0))
    return np.where(t < 1.0, 1.0 - t, 0.0)


def _weights(n_in: int, n_out: int, bicubic: bool, first: int, count: int) -> tuple[np.ndarray, int]:
    """int16 weights of outputs first..first+count as a dense (n_in, count) float64 matrix, and their precision
    bits (ATen's _compute_index_ranges_int16_weights for antialias=True, align_corners=False)."""
    scale = n_in / n_out
    support = (2.0 if bicubic else 1.0) * max(scale, 1.0)
    taps = math.ceil(support) * 2 + 1
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    i = np.arange(n_out)
    center = scale * (i + 0.5)
    xmin = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)  # C++ casts truncate
    xsize = np.clip(np.minimum(np.trunc(center + support + 0.5).astype(np.int64), n_in) - xmin, 0, taps)
    j = np.arange(taps)
    used = j[None] < xsize[:, None]  # (n_out, taps)
    w = np.where(used, _filter(np.abs(((j[None] + xmin[:, None]) - center[:, None] + 0.5) * invscale), bicubic), 0.0)
    total = np.cumsum(w, axis=1)[:, -1:]  # summed left to right as the C++ loop does (np.sum pairs terms up)
    w = np.where(total != 0.0, w / np.where(total != 0.0, total, 1.0), w)
    w_max = np.where(total[:, 0] != 0.0, w.max(1), 0.0).max()
    bits = next((b for b in range(22) if int(0.5 + w_max * (1 << (b + 1))) >= (1 << 15)), 22)
    v = w * (1 << bits)
    w16 = np.where(v < 0, np.trunc(v - 0.5), np.trunc(v + 0.5))  # (n_out, taps), int16 values
    rows = slice(first, first + count)
    m = np.zeros((n_in, count), np.float64)
    cols = np.broadcast_to(np.arange(count)[:, None], (count, taps))
    m[(xmin[rows, None] + j[None])[used[rows]], cols[used[rows]]] = w16[rows][used[rows]]
    return m, bits


@functools.lru_cache(maxsize=32)
def _matrix(n_in: int, n_out: int, bicubic: bool, first: int, count: int, device: str,
            transpose: bool) -> tuple[torch.Tensor, int]:
    """_weights as a tensor on `device` ((count, n_in) if `transpose`), kept there: photos of one camera share
    sizes, so each batch would otherwise copy the same megabytes to the GPU again."""
    m, bits = _weights(n_in, n_out, bicubic, first, count)
    return torch.from_numpy(m.T.copy() if transpose else m).to(device), bits


def _pass(acc: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer sums (float64, exact) -> uint8: add half, arithmetic shift, clamp (ATen's rounding)."""
    return ((acc.to(torch.int64) + (1 << bits >> 1)) >> bits).clamp_(0, 255).to(torch.uint8)


def resize_exact(x: torch.Tensor, out_h: int, out_w: int, bicubic: bool, rows: tuple[int, int] | None = None,
                 cols: tuple[int, int] | None = None) -> torch.Tensor:
    """uint8 (n, C, H, W) -> uint8 (n, C, rows[1], cols[1]): F.interpolate(x, (out_h, out_w), antialias=True) on
    the CPU, cut to output rows rows[0]..rows[0]+rows[1] and columns likewise (default: all), on x's device."""
    h, w = x.shape[2:]
    top, height = rows or (0, out_h)
    left, width = cols or (0, out_w)
    if out_w != w:  # width first: ATen's order, and its uint8 rounding between the passes
        m, bits = _matrix(w, out_w, bicubic, left, width, str(x.device), False)  # (W, width)
        x = _pass(x.double() @ m, bits)  # (n, C, H, width)
    else:
        x = x[..., left:left + width]
    if out_h != h:
        m, bits = _matrix(h, out_h, bicubic, top, height, str(x.device), True)  # (height, H)
        x = _pass(m @ x.double(), bits)  # (n, C, height, width)
    else:
        x = x[..., top:top + height, :]
    return x


def crop_box(h: int, w: int, resize: int, size: int) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """`resize_crop`'s geometry for an (h, w) image: the aspect-bounded region kept ((top, height), (left, width)),
    and the resized size (out_h, out_w) whose centre size x size crop is the network input."""
    short = min(h, w)
    ch, cw = min(h, 3 * short), min(w, 3 * short)  # long side cut to 3x the short side
    return ((h - ch) // 2, ch), ((w - cw) // 2, cw), (resize * ch // short, resize * cw // short)


def resize_crop_exact(x: torch.Tensor, resize: int, size: int, bicubic: bool) -> torch.Tensor:
    """uint8 (n, C, H, W) -> (n, C, size, size): `resize_crop` (luma already applied) with the CPU's pixels on any
    device."""
    (top, ch), (left, cw), (nh, nw) = crop_box(x.shape[2], x.shape[3], resize, size)
    x = x[:, :, top:top + ch, left:left + cw]
    return resize_exact(x, nh, nw, bicubic, rows=((nh - size) // 2, size), cols=((nw - size) // 2, size))
