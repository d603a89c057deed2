"""FER-2013 mini-Xception (Arriaga et al. 2017) ported to PyTorch, weights read from the Keras 2 HDF5
with h5py. Input: uint8 grayscale (B, 1, 64, 64), scaled to [-1, 1] by the Embedder. Output: the 128-d
pooled output of the last residual module, followed by the 7 FER log-probabilities
(angry, disgust, fear, happy, sad, surprise, neutral) -> (B, 135).

Keras 'same' padding is asymmetric for stride 2 (the extra row/column goes after), so pads are explicit,
and max-pool pads with -inf (Keras never picks a pad)."""
from __future__ import annotations

import math
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from features.errors import UserError

WEIGHTS = Path(__file__).resolve().parent / "weights" / "fer2013_mini_xception.hdf5"
FER_CLASSES = ["angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"]


def _same_pad(size: int, k: int, s: int) -> tuple[int, int]:
    out = math.ceil(size / s)
    total = max((out - 1) * s + k - size, 0)
    return total // 2, total - total // 2


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=1e-3)


class SeparableConv(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.depthwise = nn.Conv2d(cin, cin, 3, padding=1, groups=cin, bias=False)  # 'same', stride 1
        self.pointwise = nn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x):
        return self.pointwise(self.depthwise(x))


class Residual(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.sep1, self.bn1 = SeparableConv(cin, cout), _bn(cout)
        self.sep2, self.bn2 = SeparableConv(cout, cout), _bn(cout)
        self.short, self.bn_short = nn.Conv2d(cin, cout, 1, stride=2, bias=False), _bn(cout)

    def forward(self, x):  # (B, cin, H, W) -> (B, cout, ceil(H/2), ceil(W/2))
        y = self.bn2(self.sep2(F.relu(self.bn1(self.sep1(x)))))
        ph, pw = _same_pad(y.shape[2], 3, 2), _same_pad(y.shape[3], 3, 2)
        y = F.max_pool2d(F.pad(y, (*pw, *ph), value=float("-inf")), 3, stride=2)
        sh, sw = _same_pad(x.shape[2], 1, 2), _same_pad(x.shape[3], 1, 2)
        return y + self.bn_short(self.short(F.pad(x, (*sw, *sh))))


class MiniXception(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 8, 3, bias=False), _bn(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, bias=False), _bn(8)
        self.blocks = nn.Sequential(Residual(8, 16), Residual(16, 32), Residual(32, 64), Residual(64, 128))
        self.classifier = nn.Conv2d(128, 7, 3, padding=1)

    def forward(self, x):  # (B, 1, 64, 64) in [-1, 1]
        x = F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))  # (B, 8, 60, 60)
        x = self.blocks(x)  # (B, 128, 4, 4)
        logits = self.classifier(x).mean((2, 3))  # (B, 7)
        return torch.cat([x.mean((2, 3)), F.log_softmax(logits, 1)], 1)  # (B, 135)


def _keras_weights(path: Path) -> dict[str, dict[str, np.ndarray]]:
    out: dict[str, dict[str, np.ndarray]] = {}
    with h5py.File(path, "r") as f:
        g = f["model_weights"] if "model_weights" in f else f
        for layer in g:
            def visit(name, obj, layer=layer):
                if isinstance(obj, h5py.Dataset):
                    out.setdefault(layer, {})[name.rsplit("/", 1)[-1].split(":")[0]] = obj[()]
            g[layer].visititems(visit)
    return out


def _conv(w: np.ndarray) -> torch.Tensor:  # Keras (kh, kw, in, out) -> torch (out, in, kh, kw)
    return torch.from_numpy(np.ascontiguousarray(w.transpose(3, 2, 0, 1)))


def _depthwise(w: np.ndarray) -> torch.Tensor:  # Keras (kh, kw, in, 1) -> torch (in, 1, kh, kw)
    return torch.from_numpy(np.ascontiguousarray(w.transpose(2, 3, 0, 1)))


def _set_bn(bn: nn.BatchNorm2d, w: dict[str, np.ndarray]) -> None:
    for ours, theirs in (("weight", "gamma"), ("bias", "beta"), ("running_mean", "moving_mean"),
                         ("running_var", "moving_variance")):
        getattr(bn, ours).data.copy_(torch.from_numpy(w[theirs]))


def load_fer(weights: str | None) -> tuple[nn.Module, dict, dict]:
    """(model, timm-style data config, state dict). Layer names follow the Keras file's model_config,
    whose numbering is not in module order (e.g. batch_normalization_3 is the first shortcut's BN)."""
    path = Path(weights) if weights else WEIGHTS
    if not path.is_file():
        raise UserError(f"backbone fer_mini_xception: weights file {path} missing; reinstall imgsent or pass --weights")
    try:
        w = _keras_weights(path)
    except OSError as e:
        raise UserError(f"{path}: not a Keras HDF5 weights file ({e}); pass the FER-2013 mini-Xception .hdf5") from None
    m = MiniXception()
    try:
        with torch.no_grad():
            m.conv1.weight.copy_(_conv(w["conv2d_1"]["kernel"]))
            _set_bn(m.bn1, w["batch_normalization_1"])
            m.conv2.weight.copy_(_conv(w["conv2d_2"]["kernel"]))
            _set_bn(m.bn2, w["batch_normalization_2"])
            for i, blk in enumerate(m.blocks):
                s1, s2 = w[f"separable_conv2d_{2 * i + 1}"], w[f"separable_conv2d_{2 * i + 2}"]
                blk.sep1.depthwise.weight.copy_(_depthwise(s1["depthwise_kernel"]))
                blk.sep1.pointwise.weight.copy_(_conv(s1["pointwise_kernel"]))
                blk.sep2.depthwise.weight.copy_(_depthwise(s2["depthwise_kernel"]))
                blk.sep2.pointwise.weight.copy_(_conv(s2["pointwise_kernel"]))
                # per module: BN numbering 3k (shortcut), 3k+1 (after sep1), 3k+2 (after sep2), k = i+1
                _set_bn(blk.bn_short, w[f"batch_normalization_{3 * i + 3}"])
                _set_bn(blk.bn1, w[f"batch_normalization_{3 * i + 4}"])
                _set_bn(blk.bn2, w[f"batch_normalization_{3 * i + 5}"])
                blk.short.weight.copy_(_conv(w[f"conv2d_{i + 3}"]["kernel"]))
            m.classifier.weight.copy_(_conv(w["conv2d_7"]["kernel"]))
            m.classifier.bias.copy_(torch.from_numpy(w["conv2d_7"]["bias"]))
    except (KeyError, RuntimeError) as e:
        raise UserError(f"{path}: weights do not fit mini-Xception ({e}); pass the FER-2013 mini-Xception .hdf5") from None
    cfg = {"input_size": (1, 64, 64), "crop_pct": 1.0, "interpolation": "bicubic", "mean": (0.5,), "std": (0.5,),
           "grayscale": True}
    return m.eval(), cfg, m.state_dict()
