"""MTCNN face detector (Zhang et al. 2016, "Joint Face Detection and Alignment using Multi-task Cascaded
Convolutional Networks") in plain torch, with the weights of facenet-pytorch 2.6.0 shipped in
features/models/weights/mtcnn.pt (MIT, see LICENSE-mtcnn-facenet-pytorch-MIT.txt). Needs no OpenCV, so face mode
works whatever OpenCV a machine has (5.x dropped the Haar cascades the previous detector used).

    boxes, scores = MTCNN.load().detect(rgb, min_face=40)   # rgb (H, W, 3) uint8 -> (K, 4) x0 y0 x1 y1, (K,)

Three networks in cascade: PNet slides a 12 px window over an image pyramid (fully convolutional, stride 2)
and proposes boxes; RNet rescores 24 px crops of them; ONet rescores 48 px crops and refines the boxes. Each
stage drops boxes below its threshold and merges overlapping ones (non-maximum suppression).
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

WEIGHTS = Path(__file__).resolve().parent / "weights" / "mtcnn.pt"
THRESHOLDS = (0.6, 0.7, 0.7)  # PNet, RNet, ONet face probability (facenet-pytorch's defaults)
PYRAMID_STEP = 0.709  # each pyramid level is this fraction of the previous one (area halves)


def _convs(spec: list[tuple[int, int, int, int]]) -> list[tuple[str, nn.Module]]:
    """(in, out, kernel, pool) per block -> named conv, PReLU and optional max-pool layers."""
    layers = []
    for i, (cin, cout, k, pool) in enumerate(spec, start=1):
        layers += [(f"conv{i}", nn.Conv2d(cin, cout, k)), (f"prelu{i}", nn.PReLU(cout))]
        if pool:
            layers.append((f"pool{i}", nn.MaxPool2d(pool, 2, ceil_mode=True)))
    return layers


class PNet(nn.Module):
    """(B, 3, H, W) -> box offsets (B, 4, H', W') and face probability (B, H', W'), one cell per 12 px window."""

    def __init__(self):
        super().__init__()
        for name, layer in _convs([(3, 10, 3, 2), (10, 16, 3, 0), (16, 32, 3, 0)]):
            self.add_module(name, layer)
        self.conv4_1, self.conv4_2 = nn.Conv2d(32, 2, 1), nn.Conv2d(32, 4, 1)

    def forward(self, x):
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(self.pool1(self.prelu1(self.conv1(x)))))))
        return self.conv4_2(x), F.softmax(self.conv4_1(x), dim=1)[:, 1]


class _Dense(nn.Module):
    """RNet / ONet: conv blocks, then a dense layer on the (B, W, H, C)-ordered flattening the weights expect."""

    def __init__(self, convs, flat: int, width: int, heads: dict[str, int]):
        super().__init__()
        self.n_conv = len(convs)
        for name, layer in _convs(convs):
            self.add_module(name, layer)
        d = self.n_conv + 1
        self.add_module(f"dense{d}", nn.Linear(flat, width))
        self.add_module(f"prelu{d}", nn.PReLU(width))
        for name, out in heads.items():
            self.add_module(name, nn.Linear(width, out))
        self.heads = list(heads)

    def forward(self, x):
        for i in range(1, self.n_conv + 1):
            x = getattr(self, f"prelu{i}")(getattr(self, f"conv{i}")(x))
            if hasattr(self, f"pool{i}"):
                x = getattr(self, f"pool{i}")(x)
        d = self.n_conv + 1
        x = x.permute(0, 3, 2, 1).reshape(len(x), -1)  # (B, W*H*C): the original Caffe layout
        x = getattr(self, f"prelu{d}")(getattr(self, f"dense{d}")(x))
        prob, offsets = (getattr(self, h)(x) for h in self.heads[:2])
        return offsets, F.softmax(prob, dim=1)[:, 1]  # (B, 4), (B,)


class MTCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.pnet = PNet()
        self.rnet = _Dense([(3, 28, 3, 3), (28, 48, 3, 3), (48, 64, 2, 0)], 576, 128,
                           {"dense5_1": 2, "dense5_2": 4})
        self.onet = _Dense([(3, 32, 3, 3), (32, 64, 3, 3), (64, 64, 3, 2), (64, 128, 2, 0)], 1152, 256,
                           {"dense6_1": 2, "dense6_2": 4, "dense6_3": 10})  # 6_3: landmarks, unused

    @staticmethod
    @functools.lru_cache(maxsize=1)
    def load() -> "MTCNN":
        net = MTCNN()
        net.load_state_dict(torch.load(WEIGHTS, map_location="cpu", weights_only=True))
        return net.eval().requires_grad_(False)

    @torch.inference_mode()
    def detect(self, rgb: np.ndarray, min_face: float = 20.0) -> tuple[np.ndarray, np.ndarray]:
        """Faces of at least `min_face` px in an RGB uint8 image (H, W, 3): boxes (K, 4) as x0, y0, x1, y1 in
        pixels and their ONet probability (K,), best first."""
        img = (torch.from_numpy(np.array(rgb)).permute(2, 0, 1)[None].float() - 127.5) / 128.0  # (1, 3, H, W)
        h, w = rgb.shape[:2]
        boxes = self._propose(img, max(12.0, min_face))  # (K, 5) x0 y0 x1 y1 score
        for net, size, thr in ((self.rnet, 24, THRESHOLDS[1]), (self.onet, 48, THRESHOLDS[2])):
            if not len(boxes):
                break
            boxes = _square(boxes)
            offsets, prob = net(_crops(img, boxes, size))
            keep = prob.numpy() > thr
            boxes, offsets = np.c_[boxes[keep, :4], prob.numpy()[keep]], offsets.numpy()[keep]
            if net is self.rnet:  # merge, then refine (as the reference implementation orders it)
                pick = _nms(boxes, 0.7, "union")
                boxes = _regress(boxes[pick], offsets[pick])
            else:  # refine, then merge boxes mostly inside a better one
                boxes = _regress(boxes, offsets)
                boxes = boxes[_nms(boxes, 0.7, "min")]
        boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, w)
        boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, h)
        return boxes[:, :4], boxes[:, 4]

    def _propose(self, img: torch.Tensor, min_face: float) -> np.ndarray:
        """PNet over the image pyramid: candidate boxes (K, 5) from every scale whose 12 px window sees a face
        of `min_face` px or more, merged across scales."""
        h, w = img.shape[2:]
        scale, found = 12.0 / min_face, []
        while min(h, w) * scale >= 12:
            x = F.interpolate(img, size=(int(h * scale + 1), int(w * scale + 1)), mode="area")
            offsets, prob = self.pnet(x)  # (1, 4, h', w'), (1, h', w')
            ys, xs = np.nonzero(prob[0].numpy() >= THRESHOLDS[0])
            if len(ys):
                cells = np.c_[xs, ys].astype(np.float64)  # (K, 2) cell positions, stride 2 in the scaled image
                b = np.c_[np.floor((2 * cells + 1) / scale), np.floor((2 * cells + 12) / scale),
                          prob[0].numpy()[ys, xs], offsets[0].numpy()[:, ys, xs].T]  # (K, 9)
                found.append(b[_nms(b, 0.5, "union")])
            scale *= PYRAMID_STEP
        if not found:
            return np.zeros((0, 5))
        b = np.concatenate(found)
        b = b[_nms(b, 0.7, "union")]
        return _regress(b[:, :5], b[:, 5:9], plus_one=False)


def _square(b: np.ndarray) -> np.ndarray:
    """Boxes grown to squares about their centres (the networks were trained on square crops)."""
    b = b.copy()
    w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    side = np.maximum(w, h)
    b[:, 0] += w / 2 - side / 2
    b[:, 1] += h / 2 - side / 2
    b[:, 2], b[:, 3] = b[:, 0] + side, b[:, 1] + side
    return b


def _regress(b: np.ndarray, offsets: np.ndarray, plus_one: bool = True) -> np.ndarray:
    """Apply a network's box offsets (K, 4), in units of the box's width and height."""
    b = b.copy()
    w, h = b[:, 2] - b[:, 0] + plus_one, b[:, 3] - b[:, 1] + plus_one
    b[:, :4] += offsets * np.stack([w, h, w, h], 1)
    return b


def _crops(img: torch.Tensor, boxes: np.ndarray, size: int) -> torch.Tensor:
    """(K, 3, size, size) crops of the normalised image (1, 3, H, W) inside each box (clipped to the image)."""
    h, w = img.shape[2:]
    b = np.trunc(boxes[:, :4]).astype(np.int64)
    x0, y0 = np.maximum(b[:, 0], 1) - 1, np.maximum(b[:, 1], 1) - 1  # 1-based, as the weights were trained
    x1, y1 = np.minimum(b[:, 2], w), np.minimum(b[:, 3], h)
    out = torch.zeros(len(b), 3, size, size)
    for k in range(len(b)):
        if x1[k] > x0[k] and y1[k] > y0[k]:
            out[k] = F.interpolate(img[:, :, y0[k]:y1[k], x0[k]:x1[k]], size=(size, size), mode="area")[0]
    return out


def _nms(b: np.ndarray, threshold: float, kind: str) -> np.ndarray:
    """Indices of boxes (K, >= 5: x0 y0 x1 y1 score) kept by greedy non-maximum suppression, best first;
    overlap = intersection over union, or over the smaller box ('min')."""
    order = np.argsort(-b[:, 4], kind="stable")
    area = (b[:, 2] - b[:, 0] + 1) * (b[:, 3] - b[:, 1] + 1)
    keep = []
    while len(order):
        i, rest = order[0], order[1:]
        keep.append(i)
        iw = np.maximum(0.0, np.minimum(b[i, 2], b[rest, 2]) - np.maximum(b[i, 0], b[rest, 0]) + 1)
        ih = np.maximum(0.0, np.minimum(b[i, 3], b[rest, 3]) - np.maximum(b[i, 1], b[rest, 1]) + 1)
        inter = iw * ih
        denom = np.minimum(area[i], area[rest]) if kind == "min" else area[i] + area[rest] - inter
        order = rest[inter / denom <= threshold]
    return np.array(keep, dtype=np.int64)
