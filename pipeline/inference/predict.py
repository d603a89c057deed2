"""Images -> labels with calibrated probabilities, through every backbone the model was trained on.

    p = load_model("out/model").predict(["a.jpg", "photos/"])   # p.labels, p.probs (N, C), p.class_names

Each source (by default each folder argument, the files named together, or a manifest's group) is adapted to the
training statistics as the model's CV chose (heads/adapt.py): a prediction then depends on the other images of
its source, and p.sources / p.adapted say so per image. source="none" predicts each image on its own.

A model trained on face-mode stores (features/models/faces.py) detects faces the same way, classifies every face crop
(p.faces) and gives each image the mean of its faces' calibrated probabilities.

Images already extracted are predicted from their stores (`predict(["photos.h5"])`, one store per backbone): the
cached features instead of the backbones, each manifest group of the store a source, else the whole store.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from features.models.backbones import Backbone, load_backbone
from features.models.embed import iter_embeddings, iter_face_embeddings, resolve_device
from features.errors import UserError
from features.models.faces import spec_of, without_faces
from features.storage.store import describe_mismatch, other_imgsent
from pipeline.heads.adapt import source_logits_each
from pipeline.heads.sources import Adapted, per_source, rows_logits
from pipeline.heads.head import Head, softmax
from pipeline.data.rows import means_by_owner, open_rows
from pipeline.inference.modeldir import ModelInfo, load_model_dir
from pipeline.inference.predictions import (STORE_SUFFIXES, FaceRows, Predictions, check_predict_args, expand_paths,
                                           image_sources)
from pipeline.inference.ood import (DEFAULT_QUANTILE, knn_distance, load_ood, normalise, rows_distance,
                                   threshold)
from pipeline.transforms import NONE


NAMES = ("the model", "this imgsent")  # describe_mismatch's roles here


class Predictor:
    """A validated trained head plus the backbones it needs, loaded once on first use."""

    def __init__(self, model_dir: str | Path, *, device: str = "auto"):
        self.dir = Path(model_dir)
        self.head: Head
        self.info: ModelInfo
        self.head, self.info = load_model_dir(self.dir)
        self.class_names: list[str] = self.info.class_names
        resolve_device(device)  # a bad name or a missing GPU is refused now, before any image is read
        self.requested_device = device
        self.device = device if device != "auto" else None  # auto: decided by the first job's size (embed)
        self._backbones: list[Backbone] | None = None
        self.ood = load_ood(self.dir, self.info.ood, self.info.dim) if self.info.ood else None  # (ref, loo)
        specs = [spec_of(fp) for fp in self.info.backbones]
        self.faces = next((sp for sp in specs if sp is not None), None)  # one face setting per model (rows.py)

    @property
    def backbones(self) -> list[Backbone]:
        if self._backbones is None:
            if self.device is None:
                self.device = resolve_device(self.requested_device)
            loaded = []
            for fp, w in zip(self.info.backbones, self.info.backbone_weights):
                bb = load_backbone(fp["backbone"], weights=w, device=self.device)
                if bb.fingerprint != without_faces(fp):
                    fix = ("re-extract its training images with this imgsent and re-run train-head, or predict with the "
                           "imgsent that trained it" if other_imgsent(without_faces(fp), bb.fingerprint) else
                           "install the same weights")
                    raise UserError(f"{self.dir}: backbone {fp['backbone']} here differs from the one the model was "
                                    f"trained on ({describe_mismatch(without_faces(fp), bb.fingerprint, NAMES)}); "
                                    f"{fix}")
                loaded.append(bb)
            self._backbones = loaded
        return self._backbones

    def embed(self, paths: list[str], *, batch_size: int = 32, workers: int | str = "auto", progress: bool = False,
              engine: str = "auto") -> tuple[np.ndarray, np.ndarray, np.ndarray | None, list[str]]:
        """(features (R, sum D), (image index, face index) per row (R, 2), crop boxes (R, 4) or None, error per
        image): one row per image that worked, or in face mode one per face (a whole-image backbone's row is
        repeated for every face of its image, as in training)."""
        errors = [""] * len(paths)
        whole: dict[int, np.ndarray] = {}  # backbone -> (N, D), NaN where the image failed
        crops: dict[int, dict[int, list]] = {}  # face backbone -> image -> [(box, (D,) features)] left to right
        if self.device is None:
            self.device = resolve_device(self.requested_device, images=len(paths))
        kw = dict(batch_size=batch_size, workers=workers, device=self.device, progress=progress, engine=engine)
        for j, bb in enumerate(self.backbones):
            if spec_of(self.info.backbones[j]) is None:
                whole[j] = np.full((len(paths), bb.dim), np.nan, dtype=np.float32)
                batches = ((idx, f, None, e) for idx, f, e in iter_embeddings(bb, paths, desc=bb.name, **kw))
            else:
                crops[j] = {}
                batches = iter_face_embeddings(bb, paths, self.faces, desc=bb.name, **kw)
            for idx, feats, boxes, errs in batches:
                if j in whole:
                    whole[j][idx] = feats
                else:
                    for i, b, f in zip(idx, boxes.tolist(), feats):
                        crops[j].setdefault(i, []).append((tuple(b), f))
                for i, e in errs.items():
                    errors[i] = errors[i] or e
        rows: list[tuple[int, int]] = []  # (image, face)
        boxes: list[tuple] = []
        for i in range(len(paths)):
            if errors[i]:
                continue
            if not crops:
                rows.append((i, 0))
                continue
            found = [[b for b, _ in c.get(i, [])] for c in crops.values()]
            if any(f != found[0] for f in found):  # the detector is deterministic: only a broken install gets here
                errors[i] = "face crops differ between backbones"
                continue
            rows += [(i, k) for k in range(len(found[0]))]
            boxes += found[0]
        cols = [whole[j][[i for i, _ in rows]] if j in whole else
                np.array([crops[j][i][k][1] for i, k in rows], np.float32).reshape(len(rows), -1)
                for j in range(len(self.backbones))]
        feats = np.concatenate(cols, axis=1) if rows else np.zeros((0, self.info.dim), np.float32)  # (R, D)
        return (feats, np.array(rows, np.int64).reshape(-1, 2),
                np.array(boxes, np.int64).reshape(-1, 4) if crops else None, errors)

    def predict_features(self, features: np.ndarray, sources: list[str] | np.ndarray | None = None
                         ) -> tuple[np.ndarray, dict[str, Adapted], list[str]]:
        """Raw features (N, D) -> calibrated probabilities (N, C), each source (a name per row; None: each row on its
        own) adapted by the model's transform; and per source and per row what the prediction rests on."""
        t = self.info.adapt if sources is not None else NONE
        logits, per_row, said = per_source(self.head, sources, len(features), (t,),
                                           lambda pos: source_logits_each(self.head, features[pos], (t,)))[t]
        return softmax(logits, self.head.temperature).astype(np.float32), said, per_row

    def predict(self, inputs: list[str], *, min_confidence: float = 0.0, batch_size: int = 32,
                workers: int | str = "auto", progress: bool = False, engine: str = "auto",
                ood_quantile: float = DEFAULT_QUANTILE, source: str = "argument") -> Predictions:
        """`source`: which images are adapted together (SOURCES): each folder / manifest group / the files named
        ('argument'), all of them ('call'), or none (each image on its own, as the exported model)."""
        check_predict_args(batch_size=batch_size, workers=workers, min_confidence=min_confidence,
                           ood_quantile=ood_quantile, engine=engine, source=source)
        stores = [str(q) for q in inputs if Path(q).suffix.lower() in STORE_SUFFIXES]
        if stores:  # images extracted already: their cached features, not the backbones again
            if len(stores) < len(inputs):
                raise UserError(f"{stores[0]}: a feature store among images; pass either images (folders, files, "
                                "manifests) or the stores they were extracted to (one per backbone), not both")
            return self.predict_stores(stores, min_confidence=min_confidence, ood_quantile=ood_quantile, source=source)
        t0 = time.time()
        paths, type_errors, arg_sources = expand_paths(list(inputs))
        todo = np.array([i for i in range(len(paths)) if i not in type_errors], dtype=np.int64)
        feats, rows, boxes, errs = self.embed([paths[i] for i in todo], batch_size=batch_size, workers=workers,
                                              progress=progress, engine=engine)  # (R, D)
        errors = [type_errors.get(i, "") for i in range(len(paths))]
        for i, e in zip(todo, errs):
            errors[i] = e
        owner = todo[rows[:, 0]]  # (R,) index into paths
        image_source = image_sources(arg_sources, source)
        row_probs, said, row_said = self.predict_features(feats, None if source == "none" else image_source[owner]) \
            if len(feats) else (np.zeros((0, len(self.class_names)), np.float32), {}, [])  # (R, C)
        row_scores = np.full(len(feats), np.nan, np.float32)  # (R,) how unlike the training images
        if self.ood is not None and len(feats):
            row_scores = knn_distance(normalise(feats), self.ood[0]).astype(np.float32)
        return self._label(paths, errors, image_source, owner, rows[:, 1], boxes, row_probs, said, row_said,
                           row_scores, t0=t0, min_confidence=min_confidence, ood_quantile=ood_quantile)

    def predict_stores(self, stores: list[str], *, min_confidence: float = 0.0,
                       ood_quantile: float = DEFAULT_QUANTILE, source: str = "argument") -> Predictions:
        """predict on images already extracted: their features read from the store(s), one per backbone of the
        model in its order (as evaluate takes them), instead of running the backbones again. Each manifest group
        of the store is a source, else the whole store (as predict adapts the folder or manifest it came from).
        Memory as train-head's: past the model's cv.memory_budget_mb the store is read in blocks."""
        check_predict_args(batch_size=1, workers=0, min_confidence=min_confidence, ood_quantile=ood_quantile,
                           engine="auto", source=source)
        t0 = time.time()
        rows = open_rows(stores, expect=self.info.backbones, intersect=True, memory_budget_mb=self.info.memory_budget_mb)
        paths, owner = np.unique(np.asarray(rows.paths, dtype=str), return_inverse=True)  # images; each row's
        first = np.unique(owner, return_index=True)[1]  # (I,) the first row of each image
        groups = rows.groups or [""] * len(rows)
        image_source = image_sources([groups[i] or stores[0] for i in first], source)
        every = np.ones(len(rows), bool)
        logits, row_said, said = rows_logits(self.head, rows, every, None if source == "none" else
                                             image_source[owner], self.info.adapt if source != "none" else NONE)
        row_probs = softmax(logits, self.head.temperature).astype(np.float32)  # (R, C)
        row_scores = rows_distance(rows, every, self.ood[0] if self.ood is not None else None)  # (R,)
        faced = rows.face_index is not None
        return self._label([str(Path(rows.root, q)) for q in paths], [""] * len(paths), image_source, owner,
                           rows.face_index if faced else np.zeros(len(rows), np.int64),
                           rows.face_boxes if faced else None, row_probs, said, row_said, row_scores.astype(np.float32),
                           t0=t0, min_confidence=min_confidence, ood_quantile=ood_quantile)

    def _label(self, paths: list[str], errors: list[str], image_source: np.ndarray, owner: np.ndarray,
               face: np.ndarray, boxes: np.ndarray | None, row_probs: np.ndarray, said: dict[str, Adapted],
               row_said: list[str], row_scores: np.ndarray, *, t0: float, min_confidence: float,
               ood_quantile: float) -> Predictions:
        """Rows (one per image that worked; face mode: per face) -> images. owner (R,): each row's index in paths,
        face (R,) its face index, row_probs (R, C) calibrated, row_scores (R,) unlikeness; each image gets the mean
        over its rows and its label ('unsure' below min_confidence or unlike the training images)."""
        n = len(paths)
        adapted = [""] * n
        for i, a in zip(owner, row_said):
            adapted[i] = a
        thr, note = None, ""
        if self.ood is not None:
            thr, note = threshold(self.ood[1], ood_quantile) if ood_quantile < 1 else (float("inf"), "")
        probs, scores = means_by_owner(owner, n, row_probs, row_scores[:, None])  # NaN for images that failed
        probs, scores = probs.astype(np.float32), scores[:, 0].astype(np.float32)

        def label(p: np.ndarray, score: float, err: str) -> str:
            if err:
                return ""
            if p.max() < min_confidence or (thr is not None and score > thr):
                return "unsure"
            return self.class_names[int(p.argmax())]

        labels = [label(probs[i], scores[i], errors[i]) for i in range(n)]
        faces, face_note = None, ""
        if boxes is not None:
            capped = int((np.bincount(owner, minlength=n) >= self.faces.max_faces).sum())
            face_note = (f"{capped} image{'s' if capped != 1 else ''} reached the limit of {self.faces.max_faces} "
                         "faces: any others in them were not classified") if capped else ""
            faces = FaceRows(image=owner, face=face, boxes=boxes, probs=row_probs,
                             labels=[label(p, s, "") for p, s in zip(row_probs, row_scores)],
                             ood_scores=row_scores if self.ood is not None else None)
        return Predictions(paths, labels, probs, errors, self.class_names, time.time() - t0,
                           scores if self.ood is not None else None, thr, faces, note, face_note,
                           sources=[str(q) for q in image_source], adapted=adapted, per_source=said)



def load_model(model_dir: str | Path, *, device: str = "auto") -> Predictor:
    return Predictor(model_dir, device=device)
