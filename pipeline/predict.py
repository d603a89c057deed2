"""Images -> labels with calibrated probabilities, through every backbone the model was trained on.

    p = load_model("out/model").predict(["a.jpg", "photos/"])   # p.labels, p.probs (N, C), p.class_names
"""
from __future__ import annotations

import csv
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from features.atomic import OutputLock, atomic_file, check_output
from features.backbones import Backbone, load_backbone
from features.embed import iter_embeddings, resolve_device
from features.engine import ENGINES
from features.errors import UserError
from features.sources import unsupported, walk_images
from features.store import describe_mismatch, safe_text
from pipeline.head import HeadNet
from pipeline.modeldir import ModelInfo, load_model_dir
from pipeline.ood import DEFAULT_QUANTILE, knn_distance, load_ood, normalise, threshold


@dataclass
class Predictions:
    paths: list[str]
    labels: list[str]  # predicted label; "" where the image failed, "unsure" below min_confidence or out of
    probs: np.ndarray  # (N, C) calibrated; NaN rows where the image failed             distribution
    errors: list[str]  # "" when fine
    class_names: list[str]
    seconds: float = 0.0
    ood_scores: np.ndarray | None = None  # (N,) k-NN distance to the training images (pipeline/ood.py); NaN on
    ood_threshold: float | None = None  # failures; None for a model directory without ood.npz


def expand_paths(inputs: list[str]) -> tuple[list[str], dict[int, str]]:
    """Files and folders -> image paths, plus {index: error} for files we cannot decode by type.
    A missing path or a folder without files is the user's mistake: one line, before any work."""
    out: list[str] = []
    errors: dict[int, str] = {}
    for p in inputs:
        path = Path(p)
        if path.is_dir():
            found, other = walk_images(path)
            if not found and not other:
                raise UserError(f"{path}: folder holds no files; pass image files or folders of images")
            for q, supported in sorted([(q, True) for q in found] + [(q, False) for q in other]):
                if not supported:
                    errors[len(out)] = unsupported(q)
                out.append(str(q))
        elif path.exists() or path.is_symlink():
            out.append(str(path))  # unreadable or odd files surface as per-row errors, not a crash
        else:
            raise UserError(f"{path}: no such file or folder; pass image files or folders of images")
    if not out:
        raise UserError("no images given; pass image files or folders of images")
    return out, errors


class Predictor:
    """A validated trained head plus the backbones it needs, loaded once on first use."""

    def __init__(self, model_dir: str | Path, *, device: str = "auto"):
        self.dir = Path(model_dir)
        self.head: HeadNet
        self.info: ModelInfo
        self.head, self.info = load_model_dir(self.dir)
        self.class_names: list[str] = self.info.class_names
        self.device = resolve_device(device)
        self._backbones: list[Backbone] | None = None
        self.ood = load_ood(self.dir, self.info.ood, self.info.dim) if self.info.ood else None  # (ref, loo)

    @property
    def backbones(self) -> list[Backbone]:
        if self._backbones is None:
            loaded = []
            for fp, w in zip(self.info.backbones, self.info.backbone_weights):
                bb = load_backbone(fp["backbone"], weights=w, device=self.device)
                if bb.fingerprint != fp:
                    raise UserError(f"{self.dir}: backbone {fp['backbone']} here differs from the one the model was "
                                    f"trained on ({describe_mismatch(fp, bb.fingerprint)}); install the same weights")
                loaded.append(bb)
            self._backbones = loaded
        return self._backbones

    def embed(self, paths: list[str], *, batch_size: int = 32, workers: int = 0,
              progress: bool = False, engine: str = "auto") -> tuple[np.ndarray, list[str]]:
        """Features (N, sum D) with NaN rows for images that failed, and the error per image."""
        blocks, errors = [], [""] * len(paths)
        for bb in self.backbones:
            block = np.full((len(paths), bb.dim), np.nan, dtype=np.float32)
            for idx, feats, errs in iter_embeddings(bb, paths, batch_size=batch_size, workers=workers,
                                                    device=self.device, progress=progress, desc=bb.name,
                                                    engine=engine):
                block[idx] = feats
                for i, e in errs.items():
                    errors[i] = errors[i] or e
            blocks.append(block)
        return np.concatenate(blocks, axis=1), errors

    def predict_features(self, features: np.ndarray) -> np.ndarray:
        """Raw features (N, D) -> calibrated probabilities (N, C)."""
        with torch.no_grad():
            return self.head(torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))).numpy()

    def predict(self, inputs: list[str], *, min_confidence: float = 0.0, batch_size: int = 32,
                workers: int = 0, progress: bool = False, engine: str = "auto",
                ood_quantile: float = DEFAULT_QUANTILE) -> Predictions:
        check_predict_args(batch_size=batch_size, workers=workers, min_confidence=min_confidence,
                           ood_quantile=ood_quantile, engine=engine)
        t0 = time.time()
        paths, type_errors = expand_paths(list(inputs))
        todo = [i for i in range(len(paths)) if i not in type_errors]
        feats, errs = self.embed([paths[i] for i in todo], batch_size=batch_size, workers=workers, progress=progress,
                                 engine=engine)
        errors = [type_errors.get(i, "") for i in range(len(paths))]
        probs = np.full((len(paths), len(self.class_names)), np.nan, dtype=np.float32)
        ok = [i for i, e in zip(todo, errs) if not e]
        for i, e in zip(todo, errs):
            errors[i] = e
        scores, thr = np.full(len(paths), np.nan, dtype=np.float32), None
        if ok:
            good = feats[[j for j, e in enumerate(errs) if not e]]  # (n, D)
            probs[ok] = self.predict_features(good)
            if self.ood is not None:
                ref, loo = self.ood
                scores[ok] = knn_distance(normalise(good, self.head.mean.numpy(), self.head.scale.numpy()), ref)
        if self.ood is not None:
            thr = threshold(self.ood[1], ood_quantile) if ood_quantile < 1 else float("inf")
        labels = []
        for i in range(len(paths)):
            if errors[i]:
                labels.append("")
            elif probs[i].max() < min_confidence or (thr is not None and scores[i] > thr):
                labels.append("unsure")
            else:
                labels.append(self.class_names[int(probs[i].argmax())])
        return Predictions(paths, labels, probs, errors, self.class_names, time.time() - t0,
                           scores if self.ood is not None else None, thr)


def check_predict_args(*, batch_size: int, workers: int, min_confidence: float, ood_quantile: float,
                       engine: str) -> None:
    """The predict options, checked before any model is loaded (the CLI) or any image read (the API)."""
    if batch_size < 1 or workers < 0:
        raise UserError(f"--batch-size {batch_size} / --workers {workers}: need batch-size >= 1 and workers >= 0")
    if not 0.0 <= min_confidence <= 1.0:
        raise UserError(f"--min-confidence {min_confidence}: must be within [0, 1]")
    if not 0.0 < ood_quantile <= 1.0:
        raise UserError(f"--ood-quantile {ood_quantile}: must be within (0, 1]; 1 never flags an image")
    if engine not in ENGINES:
        raise UserError(f"--engine {engine}: expected one of {', '.join(ENGINES)}")


def load_model(model_dir: str | Path, *, device: str = "auto") -> Predictor:
    return Predictor(model_dir, device=device)


def _is_prediction_csv(p: Path) -> bool:
    try:
        with open(p, encoding="utf-8") as f:
            return f.readline().startswith(("path,predicted,", "path,label,confidence,"))
    except (OSError, UnicodeDecodeError):
        return False


def check_prediction_out(out: str | Path) -> Path:
    return check_output(out, folder=False, is_ours=_is_prediction_csv, what="predictions CSV")


def write_prediction_csv(out: str | Path, pred: Predictions) -> None:
    """path,predicted,confidence,ood_score,p_<class>...,error: one row per input, failures included; whole or not
    at all. ood_score is empty for a model directory made before the out-of-distribution check existed."""
    scores = pred.ood_scores if pred.ood_scores is not None else np.full(len(pred.paths), np.nan)
    with OutputLock(out), atomic_file(out) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path", "predicted", "confidence", "ood_score", *[f"p_{c}" for c in pred.class_names], "error"])
        for p, lab, pr, err, sc in zip(pred.paths, pred.labels, pred.probs, pred.errors, scores):
            if err:
                w.writerow([safe_text(p), "", "", "", *[""] * len(pred.class_names), err])
            else:
                w.writerow([safe_text(p), lab, f"{pr.max():.6f}", "" if np.isnan(sc) else f"{sc:.6f}",
                            *[f"{q:.6f}" for q in pr], ""])
