"""A backbone's preprocessing: what it is (`Preprocess`, part of every store's fingerprint) and the one resize-and-crop
that extraction, predict and exported models all run (`resize_crop`, TorchScript-able), on uint8 pixels."""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes the model's input. Resizing happens on uint8 (`resize_crop`);
    normalisation happens inside `Embedder`, so exported models and the extractor share one code path."""
    size: int  # square crop side fed to the network
    resize: int  # shorter side is resized to this before the centre crop
    interpolation: str  # 'bilinear' | 'bicubic'
    mean: tuple[float, ...]
    std: tuple[float, ...]
    grayscale: bool = False  # convert to one channel (ITU-R 601-2 luma, as PIL's convert('L'))
    version: int = 5  # of the decode/resize code: bump when pixels change, so old stores are refused
    # (4: uint8 antialiased resize, within 3 levels of version 3's float one; 5: JPEG chroma upsampled by
    # replication (libjpeg-turbo's fast upsampling), the pixels nvJPEG gives, so a GPU decodes the same inputs)

    @property
    def channels(self) -> int:
        """Channels of the network's input: 1 grey, else 3."""
        return 1 if self.grayscale else 3

    def to_json(self) -> str:
        return json.dumps(self.__dict__, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Preprocess":
        d = json.loads(text)
        return cls(**{**d, "mean": tuple(d["mean"]), "std": tuple(d["std"])})


def luma(x: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> (B, 1, H, W): ITU-R 601-2 luma, rounded like PIL's convert('L')."""
    xi = x.to(torch.int32)
    return ((xi[:, 0] * 19595 + xi[:, 1] * 38470 + xi[:, 2] * 7471 + 32768) >> 16).to(torch.uint8).unsqueeze(1)


def resize_crop(x: torch.Tensor, resize: int, size: int, bicubic: bool, grayscale: bool) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> uint8 (B, C, size, size): luma if grayscale, long side cut to 3x the short
    side (a 60000 x 2 image would otherwise resize to 256 x 7.7M pixels), shorter side resized to `resize` with
    antialiasing on uint8 (no float copy of a 12 MP photo), centre crop. TorchScript-able: extraction (in its decode threads) and exported models run
    this very function, so they see identical pixels."""
    if grayscale:
        x = luma(x)
    # Integer arithmetic and no shape-dependent branches: exporters keep H and W symbolic.
    h, w = x.shape[2], x.shape[3]
    short = torch.sym_min(h, w) if not torch.jit.is_scripting() else min(h, w)
    longest = 3 * short  # aspect-ratio bound (a literal: TorchScript cannot read module constants)
    ch = torch.sym_min(h, longest) if not torch.jit.is_scripting() else min(h, longest)
    cw = torch.sym_min(w, longest) if not torch.jit.is_scripting() else min(w, longest)
    x = x.narrow(2, (h - ch) // 2, ch).narrow(3, (w - cw) // 2, cw)  # (B, C, ch, cw)
    nh, nw = resize * ch // short, resize * cw // short
    mode = "bicubic" if bicubic else "bilinear"
    if x.is_cuda:  # no uint8 antialiased kernel on CUDA: float, rounded (within 3 levels of the CPU's pixels;
        # extraction on a GPU uses resize_exact.py's bit-exact copy instead, which TorchScript cannot compile)
        x = F.interpolate(x.float(), size=[nh, nw], mode=mode, align_corners=False,
                          antialias=True).round().clamp(0, 255).to(torch.uint8)
    else:  # uint8 in, uint8 out, fixed-point weights: 3-10x the float path (channels_last: 3.6x NCHW's speed)
        x = F.interpolate(x.contiguous(memory_format=torch.channels_last), size=[nh, nw], mode=mode,
                          align_corners=False, antialias=True)
    top, left = (nh - size) // 2, (nw - size) // 2
    return x.narrow(2, top, size).narrow(3, left, size)  # static (size, size) for what follows


def prepare(rgb: np.ndarray | torch.Tensor, pre: Preprocess) -> torch.Tensor:
    """Decoded RGB uint8, an array (H, W, 3) or a tensor (3, H, W) -> network input uint8 (C, size, size): a
    channels_last view of the resized image, copied once, into its batch, by whoever batches it (making it NCHW
    here first would cost a layout conversion, 0.37 ms an image, for nothing)."""
    if isinstance(rgb, np.ndarray):
        rgb = torch.from_numpy(rgb if rgb.flags.writeable else rgb.copy()).permute(2, 0, 1)  # (3, H, W)
    return resize_crop(rgb[None], pre.resize, pre.size, pre.interpolation == "bicubic", pre.grayscale)[0]
