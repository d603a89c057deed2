"""The batched forward pass shared by `extract` and `predict`: decode + resize in DataLoader workers (uint8),
then the frozen backbone: onnxruntime or TorchScript-frozen channels_last on CPU, bf16 autocast on CUDA
(features/engine.py).

    for idx, feats, errors in iter_embeddings(backbone, paths): ...   # feats (b, D) float32
"""
from __future__ import annotations

import os
import signal
import sys
import time
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from features.backbones import Backbone, prepare
from features.engine import forward_engine
from features.errors import UserError
from features.faces import NO_FACE, FaceSpec, face_boxes
from features.images import decode

_TEST_DELAY = float(os.environ.get("IMGSENT_TEST_DELAY", "0") or 0)


class _Images(Dataset):
    def __init__(self, paths: list[str], backbone: Backbone):
        self.paths, self.pre = paths, backbone.pre
        self.blank = torch.zeros(1 if self.pre.grayscale else 3, self.pre.size, self.pre.size, dtype=torch.uint8)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        if _TEST_DELAY:
            time.sleep(_TEST_DELAY)  # fault-injection tests slow extraction down to kill it mid-run
        try:
            return prepare(decode(self.paths[i]), self.pre), ""
        except ValueError as e:
            return self.blank, str(e)
        except Exception as e:  # noqa: BLE001 - a decoder bug on one file must not stop a long run
            return self.blank, f"cannot decode: {e.__class__.__name__}: {e}"


class _Faces(_Images):
    """Face mode: one image -> its crops (k, C, S, S) uint8 and their boxes (k, 4); k = 0 with a reason when none."""

    def __init__(self, paths: list[str], backbone: Backbone, faces: FaceSpec):
        super().__init__(paths, backbone)
        self.faces = faces

    def __getitem__(self, i: int) -> tuple[torch.Tensor, np.ndarray, str]:
        if _TEST_DELAY:
            time.sleep(_TEST_DELAY)  # as in _Images: fault-injection tests kill extraction mid-run
        empty = torch.zeros((0, *self.blank.shape), dtype=torch.uint8)
        try:
            rgb = decode(self.paths[i])  # (H, W, 3)
            boxes = face_boxes(rgb, self.faces)
            if not boxes:
                return empty, np.zeros((0, 4), np.int64), NO_FACE
            crops = [prepare(rgb[y:y + h, x:x + w], self.pre) for x, y, w, h in boxes]
            return torch.stack(crops), np.array(boxes, np.int64).reshape(-1, 4), ""
        except ValueError as e:
            return empty, np.zeros((0, 4), np.int64), str(e)
        except Exception as e:  # noqa: BLE001 - as in _Images
            return empty, np.zeros((0, 4), np.int64), f"cannot decode: {e.__class__.__name__}: {e}"


def _collate_faces(batch: list) -> tuple[torch.Tensor, list[int], np.ndarray, list[str]]:
    """Crops of several images in one tensor (sum k, C, S, S), with how many belong to each image."""
    return (torch.cat([x for x, _, _ in batch]), [len(x) for x, _, _ in batch],
            np.concatenate([b for _, b, _ in batch]), [e for _, _, e in batch])


def _worker_init(_: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    torch.set_num_threads(1)


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU visible; use --device cpu or auto")
    if device not in ("cpu", "cuda"):
        raise UserError(f"--device {device}: expected auto, cpu or cuda")
    return device


def iter_embeddings(backbone: Backbone, paths: list[str], *, batch_size: int = 32, workers: int = 1,
                    device: str = "cpu", progress: bool = True, desc: str = "extract",
                    model=None, engine: str = "auto") -> Iterator[tuple[list[int], np.ndarray, dict[int, str]]]:
    """Yield (indices, features (b, D) float32, {index: error}) per batch; failed images have no row.
    `model`: a ready forward engine (features/engine.py); by default the fastest one for `device`."""
    if not paths:
        return
    model = model or forward_engine(backbone, device, batch_size, engine)
    cuda = device == "cuda"
    loader = DataLoader(_Images(paths, backbone), batch_size=batch_size, num_workers=workers,
                        worker_init_fn=_worker_init if workers else None, pin_memory=cuda,
                        prefetch_factor=4 if workers else None, persistent_workers=False)
    bar = tqdm(total=len(paths), desc=desc, unit="img", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    start = 0
    for x, errs in loader:  # x: (b, C, S, S) uint8
        idx = list(range(start, start + len(errs)))
        start += len(errs)
        ok = [k for k, e in enumerate(errs) if not e]
        feats = _forward(model, x[ok] if len(ok) < len(errs) else x, device, backbone.dim)  # (b, D)
        errors = {idx[k]: e for k, e in enumerate(errs) if e}
        finite = np.isfinite(feats).all(1)
        if not finite.all():  # never store a NaN: it would poison every head trained on the store
            errors.update({idx[ok[j]]: "the backbone gave non-finite features" for j in np.flatnonzero(~finite)})
            ok, feats = [k for k, f in zip(ok, finite) if f], feats[finite]
        bar.update(len(errs))
        yield [idx[k] for k in ok], feats, errors
    bar.close()


def _forward(model, x: torch.Tensor, device: str, dim: int) -> np.ndarray:
    """uint8 (b, C, S, S) -> features (b, D) float32 on the CPU."""
    if not len(x):
        return np.empty((0, dim), np.float32)
    cuda = device == "cuda"
    x = x.to(device, non_blocking=cuda).contiguous(memory_format=torch.channels_last)
    # inference_mode only around the forward: a context held across `yield` would leak into the caller
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
        return model(x).float().cpu().numpy()


def iter_face_embeddings(backbone: Backbone, paths: list[str], faces: FaceSpec, *, batch_size: int = 32,
                         workers: int = 1, device: str = "cpu", progress: bool = True, desc: str = "extract",
                         model=None, engine: str = "auto"
                         ) -> Iterator[tuple[list[int], np.ndarray, np.ndarray, dict[int, str]]]:
    """Face mode (features/faces.py): yield (image index per row, features (r, D), crop boxes (r, 4) int64,
    {image index: error}); an image has as many rows as faces, and none with the reason NO_FACE. An image
    whose crops are not all finite loses all of them (its row set is all or nothing)."""
    if not paths:
        return
    model = model or forward_engine(backbone, device, batch_size, engine)
    loader = DataLoader(_Faces(paths, backbone, faces), batch_size=batch_size, num_workers=workers,
                        worker_init_fn=_worker_init if workers else None, collate_fn=_collate_faces,
                        prefetch_factor=4 if workers else None, persistent_workers=False)
    bar = tqdm(total=len(paths), desc=desc, unit="img", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    start = 0
    for x, counts, boxes, errs in loader:  # x: (sum k, C, S, S) uint8
        owner = np.repeat(np.arange(start, start + len(counts)), counts)  # (sum k,) image index per crop
        errors = {start + k: e for k, e in enumerate(errs) if e}
        start += len(counts)
        feats = _forward(model, x, device, backbone.dim)  # (sum k, D)
        bad = set(owner[~np.isfinite(feats).all(1)].tolist())
        errors.update({i: "the backbone gave non-finite features" for i in bad})
        keep = ~np.isin(owner, list(bad))
        bar.update(len(counts))
        yield owner[keep].tolist(), feats[keep], boxes[keep], errors
    bar.close()
