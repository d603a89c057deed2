"""Images -> labels with calibrated probabilities, through every backbone the model was trained on.

    m = load_model("out/model"); result = m.predict(["a.jpg", "photos/"])
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from features.backbones import load_backbone
from features.errors import UserError
from features.extract import iter_embeddings, resolve_device
from features.images import walk_images
from features.store import describe_mismatch
from pipeline.head import HeadNet
from pipeline.model import load_head


@dataclass
class Predictions:
    paths: list[str]
    labels: list[str]  # "" where the image failed, "unsure" below min_confidence
    probs: np.ndarray  # (N, C) calibrated; NaN rows where the image failed
    errors: list[str]  # "" when fine
    class_names: list[str]


def expand_paths(inputs: list[str]) -> list[str]:
    out: list[str] = []
    for p in inputs:
        path = Path(p)
        if path.is_dir():
            out += [str(q) for q in walk_images(path)]
        else:
            out.append(str(path))  # missing or odd files surface as per-row errors, not a crash
    return out


class Model:
    """A trained head plus the backbones it needs, loaded on first use."""

    def __init__(self, model_dir: str | Path, *, device: str = "auto"):
        self.dir = Path(model_dir)
        self.head: HeadNet
        self.head, self.meta = load_head(self.dir)
        self.class_names: list[str] = self.meta["class_names"]
        self.device = resolve_device(device)
        self._backbones = None

    @property
    def backbones(self):
        if self._backbones is None:
            loaded = []
            weights = self.meta.get("backbone_weights") or [None] * len(self.meta["backbones"])
            for fp, w in zip(self.meta["backbones"], weights):
                bb = load_backbone(fp["backbone"], weights=w, device=self.device)
                if bb.fingerprint != fp:
                    raise UserError(f"{self.dir}: backbone {fp['backbone']} here differs from the one the model was "
                                    f"trained on ({describe_mismatch(fp, bb.fingerprint)}); install the same weights")
                loaded.append(bb)
            self._backbones = loaded
        return self._backbones

    def embed(self, paths: list[str], *, batch_size: int = 32, workers: int = 0,
              progress: bool = False) -> tuple[np.ndarray, list[str]]:
        """Features (N, sum D) with NaN rows for images that failed, and the error per image."""
        blocks, errors = [], [""] * len(paths)
        for bb in self.backbones:
            block = np.full((len(paths), bb.dim), np.nan, dtype=np.float32)
            for idx, feats, errs in iter_embeddings(bb, paths, batch_size=batch_size, workers=workers,
                                                    device=self.device, progress=progress, desc=bb.name):
                block[idx] = feats
                for i, e in errs.items():
                    errors[i] = e
            blocks.append(block)
        return np.concatenate(blocks, axis=1), errors

    def predict_features(self, features: np.ndarray) -> np.ndarray:
        """Raw features (N, D) -> calibrated probabilities (N, C)."""
        with torch.no_grad():
            return self.head(torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))).numpy()

    def predict(self, inputs: list[str], *, min_confidence: float = 0.0, batch_size: int = 32,
                workers: int = 0, progress: bool = False) -> Predictions:
        paths = expand_paths(list(inputs))
        feats, errors = self.embed(paths, batch_size=batch_size, workers=workers, progress=progress)
        ok = np.array([not e for e in errors], dtype=bool)
        probs = np.full((len(paths), len(self.class_names)), np.nan, dtype=np.float32)
        if ok.any():
            probs[ok] = self.predict_features(feats[ok])
        labels = []
        for i in range(len(paths)):
            if not ok[i]:
                labels.append("")
            elif probs[i].max() < min_confidence:
                labels.append("unsure")
            else:
                labels.append(self.class_names[int(probs[i].argmax())])
        return Predictions(paths, labels, probs, errors, self.class_names)


def load_model(model_dir: str | Path, *, device: str = "auto") -> Model:
    return Model(model_dir, device=device)


def write_prediction_csv(out: str | Path, pred: Predictions) -> None:
    """path,label,confidence,p_<class>...,error: one row per input, failures included."""
    import csv
    with open(out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "confidence", *[f"p_{c}" for c in pred.class_names], "error"])
        for p, lab, pr, err in zip(pred.paths, pred.labels, pred.probs, pred.errors):
            if err:
                w.writerow([p, "", "", *[""] * len(pred.class_names), err])
            else:
                w.writerow([p, lab, f"{pr.max():.6f}", *[f"{q:.6f}" for q in pr], ""])
