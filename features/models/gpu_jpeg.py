"""JPEGs decoded on the GPU: nvJPEG in batches, then EXIF orientation, luma and the resize in the CPU's integer
arithmetic, so the network gets the very inputs of the CPU recipe and a store's features do not depend on
where it was made.

On a GPU box the CPU cannot decode fast enough to feed the network (an H200 host's 16 cores decode ~1,100
photos/s, its GPU embeds ~9,800/s): here the decode threads only read, check and validate each file
(features/input/images.py `decode_tensor(defer_jpeg=True)`: the entropy data decoded at 1/8 size, so damaged
files are refused exactly as on the CPU) and the GPU decodes the pixels.

    x = decode_inputs(jpegs, pre, "cuda")                       # (n, C, S, S) uint8 on the GPU
    new = unchecked(jpegs, seen)                                # the first CHECKS_PER_KIND of each kind met
    ok = same_as_cpu([jpegs[i] for i in new], x[new], pre)

Why exact: nvJPEG's pixels equal libjpeg-turbo's with fast (replicating) chroma upsampling for sequential
4:4:4, 4:2:2, 4:2:0 and grey JPEGs (benchmarks/gpu_check.py measures it; the CPU recipe decodes so since
preprocessing version 5), and features/models/resize_exact.py reproduces the CPU's uint8 resize bit for bit.
`same_as_cpu` checks both on the first JPEGs of each kind a run meets (chroma subsampling, turned or not), so a
GPU or driver that decodes some kind otherwise is caught before it writes a row of that kind.

Memory: one decode call holds at most MAX_BATCH_PIXELS decoded pixels (3 bytes each, 768 MiB) on the GPU, and
the resize a float64 copy of one group of same-sized images, at most RESIZE_PIXELS (8 bytes each, 1 GiB).
"""
from __future__ import annotations

import sys

import torch

from features.input.images import JpegBytes, jpeg_pixels, upright
from features.models.preprocess import Preprocess, luma, prepare
from features.models.resize_exact import resize_crop_exact

MAX_BATCH_PIXELS = 256 * 2 ** 20
RESIZE_PIXELS = 128 * 2 ** 20 // 3  # per channel: (n, 3, H, W) float64 <= 1 GiB


def nvjpeg(datas: list[torch.Tensor], device: str) -> list[torch.Tensor]:
    """JPEG bytes (1-D uint8 tensors) -> RGB (3, H, W) uint8 on `device`, batched (torchvision's decode_jpeg:
    nvJPEG on CUDA). Raises if any image fails; callers then retry one at a time."""
    import warnings
    from torchvision.io import ImageReadMode, decode_jpeg
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torchvision >= 0.29 points to TorchCodec
        return decode_jpeg(datas, mode=ImageReadMode.RGB, device=device)


def cpu_decode(jpeg: JpegBytes) -> torch.Tensor:
    """The CPU recipe's upright pixels of a JPEG: (3, H, W) uint8."""
    return upright(jpeg_pixels(jpeg.data), jpeg.orientation)


def _one(jpeg: JpegBytes, data: torch.Tensor, device: str) -> torch.Tensor:
    """One JPEG as stored (3, H, W) on `device`: nvJPEG, or the CPU recipe's decoder where nvJPEG refuses it."""
    try:
        return nvjpeg([data], device)[0]
    except torch.cuda.OutOfMemoryError:
        raise  # not this file's fault: the caller hands the run to the CPU
    except RuntimeError:
        return jpeg_pixels(jpeg.data).to(device)


def _decode(jpegs: list[JpegBytes], device: str) -> list[torch.Tensor]:
    """Upright RGB (3, H, W) per JPEG on `device`: nvJPEG in calls of at most MAX_BATCH_PIXELS; an image nvJPEG
    refuses (its batch fails whole) goes through the CPU recipe's decoder instead. Out of GPU memory raises."""
    out: list[torch.Tensor] = []
    lo = 0
    while lo < len(jpegs):
        hi, pixels = lo, 0
        while hi < len(jpegs) and (hi == lo or pixels + jpegs[hi].pixels <= MAX_BATCH_PIXELS):
            pixels += jpegs[hi].pixels
            hi += 1
        datas = [torch.frombuffer(j.data, dtype=torch.uint8) for j in jpegs[lo:hi]]
        try:
            imgs = nvjpeg(datas, device)
        except torch.cuda.OutOfMemoryError:
            raise  # not one file's fault: the caller hands the run to the CPU
        except RuntimeError:  # a file nvJPEG will not decode fails its whole batch
            imgs = [_one(j, d, device) for j, d in zip(jpegs[lo:hi], datas)]
        out += [upright(x, j.orientation) for j, x in zip(jpegs[lo:hi], imgs)]
        lo = hi
    return out


def decode_inputs(jpegs: list[JpegBytes], pre: Preprocess, device: str) -> torch.Tensor:
    """Validated JPEGs -> the network's inputs (n, C, size, size) uint8 on `device`, equal to the CPU recipe's
    `prepare(decode_tensor(path), pre)`. Images of one size are resized together."""
    imgs = _decode(jpegs, device)
    out = torch.empty((len(imgs), pre.channels, pre.size, pre.size), dtype=torch.uint8, device=device)
    by_shape: dict[tuple[int, int], list[int]] = {}
    for k, x in enumerate(imgs):
        by_shape.setdefault(tuple(x.shape[1:]), []).append(k)
    for (h, w), ks in by_shape.items():
        step = max(1, RESIZE_PIXELS // (h * w))
        for i in range(0, len(ks), step):
            group = ks[i:i + step]
            x = torch.stack([imgs[k] for k in group])  # (g, 3, H, W)
            if pre.grayscale:
                x = luma(x)
            out[group] = resize_crop_exact(x, pre.resize, pre.size, pre.interpolation == "bicubic")
    return out


CHECKS_PER_KIND = 4  # JPEGs of each kind compared with the CPU recipe, per run


def unchecked(jpegs: list[JpegBytes], seen: dict[str, int]) -> list[int]:
    """Indices of the JPEGs still to compare with the CPU recipe: up to CHECKS_PER_KIND of each kind, counting those
    `seen` (kind -> compared so far, updated here)."""
    out = []
    for i, j in enumerate(jpegs):
        if seen.get(j.kind, 0) < CHECKS_PER_KIND:
            seen[j.kind] = seen.get(j.kind, 0) + 1
            out.append(i)
    return out


def same_as_cpu(jpegs: list[JpegBytes], got: torch.Tensor, pre: Preprocess) -> bool:
    """Whether `got` (decode_inputs' result for `jpegs`) equals the CPU recipe's inputs byte for byte. A difference
    is said in one line, naming the kinds."""
    if not jpegs:
        return True
    want = torch.stack([prepare(cpu_decode(j), pre) for j in jpegs])  # (s, C, S, S)
    bad = (got.cpu() != want).flatten(1).any(1)
    if bad.any():
        kinds = sorted({j.kind for j, b in zip(jpegs, bad.tolist()) if b})
        print(f"note: the GPU's JPEG decoder gives other pixels than the CPU's on {int(bad.sum())} of {len(want)} "
              f"images checked ({', '.join(kinds)}); decoding on the CPU instead (same features, slower)",
              file=sys.stderr, flush=True)
    return not bad.any()


def say_gpu_cannot_decode(error: Exception) -> None:
    """One line: why the GPU does not decode this run's JPEGs."""
    print(f"note: the GPU cannot decode JPEGs here ({error.__class__.__name__}: {str(error).strip()[:80]}); "
          "decoding on the CPU instead (same features, slower)", file=sys.stderr, flush=True)
