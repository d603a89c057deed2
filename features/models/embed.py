"""The batched forward pass shared by `extract` and `predict`: decode + resize in threads (uint8: one recipe
whatever the device, so a store's pixels never depend on where it was made), then the frozen backbone in fp32
(features/models/engine.py: onnxruntime or torch on CPU, torch with TF32 off on CUDA). On CUDA, JPEGs are
decoded and resized on the GPU to the same bytes (features/models/gpu_jpeg.py, checked on each run's first
JPEGs); the threads then only read and validate them.

    for idx, feats, errors in iter_embeddings(backbone, paths): ...   # feats (b, D) float32

On the CPU path (_input_batches) the decode threads write each image straight into its row of a preallocated
batch (pinned when the forward runs on CUDA and the GPU cannot decode), so the main thread only runs the forward:
no per-image work, no stack, no pin copy. On the GPU path (_gpu_jpeg_batches) the main thread hands each batch's
JPEGs to nvJPEG and places the rows on the GPU. A torch.stack in
the main thread ran its intra-op threads against the busy decode threads: 57 ms of CPU for a 32-image batch
here, where the copy itself takes 1 ms (benchmarks/feed_cost.py).

Memory: the inputs in flight (max(2 batches, 4 images per thread), rounded up to whole batches) and the batch in
the forward, 150 KB an image at 224 px, plus one image being decoded per thread (features/input/images.py
bounds that); on the GPU path a JPEG in flight is its compressed bytes, and gpu_jpeg.py bounds the GPU's share.
"""
from __future__ import annotations

import sys
from typing import Iterator

import numpy as np
import psutil
import torch
from tqdm import tqdm

from features.models.backbones import Backbone
from features.models.preprocess import prepare
from features.models.engine import forward_engine, input_layout
from features.errors import UserError
from features.models.faces import NO_FACE, FaceSpec, face_boxes
from features.models.gpu_jpeg import decode_inputs, same_as_cpu, say_gpu_cannot_decode, unchecked
from features.input.images import JpegBytes, decode_tensor
from features.input.prefetch import ordered_map, resolve_workers


def _one_thread() -> None:
    torch.set_num_threads(1)  # a decode thread's resize must not fan out into a pool of its own per thread


def _load(path: str, backbone: Backbone, defer_jpeg: bool = False) -> tuple[torch.Tensor | JpegBytes | None, str]:
    """One image -> (its network input (C, S, S) uint8, a view, "") or (None, why it was skipped); with
    `defer_jpeg`, a JPEG for the GPU to decode comes back validated but compressed (JpegBytes)."""
    try:
        img = decode_tensor(path, defer_jpeg)
        return (img if isinstance(img, JpegBytes) else prepare(img, backbone.pre)), ""
    except ValueError as e:
        return None, str(e)
    except Exception as e:  # noqa: BLE001 - a decoder bug on one file must not stop a long run
        return None, f"cannot decode: {e.__class__.__name__}: {e}"


def _load_faces(path: str, backbone: Backbone, faces: FaceSpec) -> tuple[torch.Tensor | None, np.ndarray, str]:
    """Face mode: one image -> its crops (k, C, S, S) uint8 and boxes (k, 4); (None, no boxes, why) if none."""
    none = np.zeros((0, 4), np.int64)
    try:
        rgb = decode_tensor(path)  # (3, H, W)
        boxes = face_boxes(rgb.permute(1, 2, 0).contiguous().numpy(), faces)  # (H, W, 3)
        if not boxes:
            return None, none, NO_FACE
        crops = [prepare(rgb[:, y:y + h, x:x + w], backbone.pre) for x, y, w, h in boxes]
        return torch.stack(crops), np.array(boxes, np.int64).reshape(-1, 4), ""
    except ValueError as e:
        return None, none, str(e)
    except Exception as e:  # noqa: BLE001 - as in _load
        return None, none, f"cannot decode: {e.__class__.__name__}: {e}"


AUTO_GPU_MIN_IMAGES = 1000  # below this, a GPU's start (CUDA context, cuDNN, graph capture: seconds) costs more
# than the CPU engine needs for the whole job; both give the same features (parity-checked), so only speed differs


def resolve_device(device: str, images: int | None = None) -> str:
    """auto: the GPU when one is visible and the job has `images` >= AUTO_GPU_MIN_IMAGES (None: any size)."""
    if device == "auto":
        big = images is None or images >= AUTO_GPU_MIN_IMAGES
        return "cuda" if big and torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU visible; use --device cpu or auto")
    if device not in ("cpu", "cuda"):
        raise UserError(f"--device {device}: expected auto, cpu or cuda")
    return device


FORWARD_MEMORY = 100  # peak forward memory of one image / its uint8 input bytes, about: measured 65x for Lite0,
# 130-200x for the FER net (batches of 32 and 128, torch and onnxruntime, 2026-12-02)


def work_batch(backbone: Backbone, batch_size: int, images: int) -> int:
    """The batch size a run uses: never more than its images (a trace example or a batch buffer sized by
    --batch-size 65536 for 18 images asked for 9.9 GB), refused in one line when one forward pass of it cannot fit
    in the memory available."""
    b = max(1, min(batch_size, images))
    c = backbone.pre.channels
    per_image = FORWARD_MEMORY * c * backbone.pre.size ** 2
    free = psutil.virtual_memory().available
    if b * per_image > free:
        raise UserError(f"--batch-size {batch_size}: one forward pass of {b} images at {backbone.pre.size} px needs "
                        f"~{b * per_image / 2 ** 30:.1f} GiB, more than the {free / 2 ** 30:.1f} GiB available; lower "
                        f"--batch-size (at most ~{max(1, free // per_image // 2)} here)")
    return b


def _batches(load, paths: list[str], batch_size: int, workers: int | str | None) -> Iterator[list]:
    """Lists of `load(path)` results, `batch_size` at a time, in path order, decoded ahead by threads."""
    n = resolve_workers(workers)
    window = max(2 * batch_size, 4 * n)
    batch: list = []
    for result in ordered_map(load, paths, workers=n, window=window, initializer=_one_thread):
        batch.append(result)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def _input_batches(backbone: Backbone, paths: list[str], batch_size: int, workers: int | str | None, *,
                   pinned: bool, layout: torch.memory_format) -> Iterator[tuple[torch.Tensor, list[str]]]:
    """(x (b, C, S, S) uint8, why per image: "" when decoded) per `batch_size` paths, in order. Each task fills a
    chunk of one batch's rows in a decode thread; rows of images that failed hold garbage (their reason says so)."""
    n = resolve_workers(workers)
    chunk = max(1, -(-batch_size // (2 * max(n, 1))))  # >= 2 chunks per thread and batch: threads stay balanced
    c, size = backbone.pre.channels, backbone.pre.size

    def tasks():  # pulled lazily by ordered_map, so only the batches in flight are allocated
        for start in range(0, len(paths), batch_size):
            rows = min(batch_size, len(paths) - start)
            x = torch.empty((rows, c, size, size), dtype=torch.uint8, pin_memory=pinned,
                            memory_format=layout)  # the layout the forward engine reads: no conversion there
            for lo in range(0, rows, chunk):
                yield x, start, lo, min(rows, lo + chunk)

    def fill(task) -> tuple[torch.Tensor, int, list[str]]:
        x, start, lo, hi = task
        why = []
        for row in range(lo, hi):
            img, reason = _load(paths[start + row], backbone)  # (C, S, S)
            if img is not None:
                x[row].copy_(img)
            why.append(reason)
        return x, hi, why

    reasons: list[str] = []
    window = -(-max(2 * batch_size, 4 * n) // chunk)  # tasks in flight
    for x, hi, why in ordered_map(fill, tasks(), workers=n, window=window, initializer=_one_thread):
        reasons += why
        if hi == len(x):  # the batch's last chunk: every row is filled
            yield x, reasons
            reasons = []


def _gpu_jpeg_batches(backbone: Backbone, paths: list[str], batch_size: int, workers: int | str | None, *,
                      device: str, layout: torch.memory_format) -> Iterator[tuple[torch.Tensor, list[str]]]:
    """As _input_batches, with JPEGs decoded on `device` (features/models/gpu_jpeg.py): the threads read and
    validate each JPEG and decode the other formats; the batch is assembled on `device`. The first JPEGs are
    checked against the CPU recipe, the first of each kind met (gpu_jpeg.unchecked); on a difference or any GPU
    failure, the run goes on through _input_batches from the batch at hand (one line says so), so no row ever holds
    other pixels than the CPU's."""
    c, size = backbone.pre.channels, backbone.pre.size
    start, seen = 0, {}  # JPEG kind -> images of it compared with the CPU recipe
    batches = _batches(lambda p: _load(p, backbone, defer_jpeg=True), paths, batch_size, workers)
    for batch in batches:
        x = torch.empty((len(batch), c, size, size), dtype=torch.uint8, device=device, memory_format=layout)
        jpegs = [k for k, (img, _) in enumerate(batch) if isinstance(img, JpegBytes)]
        others = [k for k, (img, _) in enumerate(batch) if isinstance(img, torch.Tensor)]
        if jpegs:
            items = [batch[k][0] for k in jpegs]
            try:
                got = decode_inputs(items, backbone.pre, device)  # (j, C, S, S)
                new = unchecked(items, seen)
                usable = same_as_cpu([items[i] for i in new], got[new], backbone.pre)
            except Exception as e:  # noqa: BLE001 - no nvJPEG, out of GPU memory, a decoder bug: the CPU decodes
                say_gpu_cannot_decode(e)
                usable = False
            if not usable:
                batches.close()  # stops the threads; the CPU path re-reads this batch's files
                yield from _input_batches(backbone, paths[start:], batch_size, workers, pinned=device == "cuda",
                                          layout=layout)
                return
            x[jpegs] = got
        if others:
            x[others] = torch.stack([batch[k][0] for k in others]).to(device)  # (o, C, S, S)
        start += len(batch)
        yield x, [why for _, why in batch]  # rows of images that failed hold garbage, as in _input_batches


def iter_embeddings(backbone: Backbone, paths: list[str], *, batch_size: int = 32, workers: int | str = "auto",
                    device: str = "cpu", progress: bool = True, desc: str = "extract",
                    model=None, engine: str = "auto") -> Iterator[tuple[list[int], np.ndarray, dict[int, str]]]:
    """Yield (indices, features (b, D) float32, {index: error}) per batch; failed images have no row.
    `model`: a ready forward engine (features/models/engine.py); by default the fastest one for `device`."""
    if not paths:
        return
    batch_size = work_batch(backbone, batch_size, len(paths))
    model = model or forward_engine(backbone, device, batch_size, engine)
    bar = tqdm(total=len(paths), desc=desc, unit="img", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    start = 0
    if device == "cuda":
        batches = _gpu_jpeg_batches(backbone, paths, batch_size, workers, device=device, layout=input_layout(model))
    else:
        batches = _input_batches(backbone, paths, batch_size, workers, pinned=False, layout=input_layout(model))
    for x, reasons in batches:
        idx = list(range(start, start + len(reasons)))
        start += len(reasons)
        ok = [k for k, why in enumerate(reasons) if not why]
        errors = {idx[k]: why for k, why in enumerate(reasons) if why}
        if len(ok) < len(x):
            x = x[ok]  # (b, C, S, S) the decoded rows only (a copy: rare)
        feats = _forward(model, x, device, backbone.dim)  # (b, D)
        finite = np.isfinite(feats).all(1)
        if not finite.all():  # never store a NaN: it would poison every head trained on the store
            errors.update({idx[ok[j]]: "the backbone gave non-finite features" for j in np.flatnonzero(~finite)})
            ok, feats = [k for k, f in zip(ok, finite) if f], feats[finite]
        bar.update(len(reasons))
        yield [idx[k] for k in ok], feats, errors
    bar.close()


def _forward(model, x: torch.Tensor | None, device: str, dim: int) -> np.ndarray:
    """uint8 (b, C, S, S) -> features (b, D) float32 on the CPU, computed in fp32 on either device."""
    if x is None or not len(x):
        return np.empty((0, dim), np.float32)
    if device == "cuda" and not x.is_cuda:
        x = (x if x.is_pinned() else x.pin_memory()).to(device, non_blocking=True)
    x = x.contiguous(memory_format=input_layout(model))  # a no-op for the batches _input_batches makes
    with torch.inference_mode():  # only around the forward: a context held across `yield` would leak out
        return model(x).float().cpu().numpy()


def iter_face_embeddings(backbone: Backbone, paths: list[str], faces: FaceSpec, *, batch_size: int = 32,
                         workers: int | str = "auto", device: str = "cpu", progress: bool = True,
                         desc: str = "extract", model=None, engine: str = "auto"
                         ) -> Iterator[tuple[list[int], np.ndarray, np.ndarray, dict[int, str]]]:
    """Face mode (features/models/faces.py): yield (image index per row, features (r, D), crop boxes (r, 4) int64,
    {image index: error}); an image has as many rows as faces, and none with the reason NO_FACE. An image
    whose crops are not all finite loses all of them (its row set is all or nothing)."""
    if not paths:
        return
    batch_size = work_batch(backbone, batch_size, len(paths))
    model = model or forward_engine(backbone, device, batch_size, engine)
    bar = tqdm(total=len(paths), desc=desc, unit="img", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    start = 0
    for batch in _batches(lambda p: _load_faces(p, backbone, faces), paths, batch_size, workers):
        counts = [0 if x is None else len(x) for x, _, _ in batch]
        owner = np.repeat(np.arange(start, start + len(batch)), counts)  # (sum k,) image index per crop
        errors = {start + k: e for k, (_, _, e) in enumerate(batch) if e}
        start += len(batch)
        crops = [x for x, _, _ in batch if x is not None]
        boxes = np.concatenate([b for _, b, _ in batch])  # (sum k, 4)
        feats = _forward(model, torch.cat(crops) if crops else None, device, backbone.dim)  # (sum k, D)
        bad = set(owner[~np.isfinite(feats).all(1)].tolist())
        errors.update({i: "the backbone gave non-finite features" for i in bad})
        keep = ~np.isin(owner, list(bad))
        bar.update(len(batch))
        yield owner[keep].tolist(), feats[keep], boxes[keep], errors
    bar.close()
