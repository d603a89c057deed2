"""Face mode: find faces in a decoded photo and cut the crops the backbone embeds instead of the whole scene.

Expression experts such as the FER-2013 CNN were trained on face crops; on a whole photo they see a room.
The detector is MTCNN (features/models/mtcnn.py, weights shipped in features/models/weights): offline, CPU-only, no OpenCV,
so the same detector runs whatever OpenCV a machine has. It replaced OpenCV's Haar cascade (BENCHMARKS.md
compares them: MTCNN finds more faces at no more false ones). Its settings and the weights file's sha256 are
part of a store's fingerprint, so stores and models made with other settings are refused, never mixed.

    spec = FaceSpec.make("all")
    boxes = face_boxes(rgb, spec)           # [(x, y, w, h), ...] crop boxes in the upright image, may be []
    crop = rgb[y:y + h, x:x + w]            # what the backbone sees

Memory bound: detection runs on a copy whose longer side is at most `max_side` (1024) px, and at most
`max_faces` (32) crops are taken from one image (the largest ones), so a crowd photo costs at most 32
network inputs.
"""
from __future__ import annotations

import functools
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from features.errors import UserError
from features.input.images import sha256_file
from features.models.mtcnn import MTCNN, WEIGHTS

MODES = ("off", "largest", "all")
FALLBACKS = ("skip", "whole")
NO_FACE = "no face found"

Box = tuple[int, int, int, int]  # x, y, w, h in pixels of the upright decoded image


@dataclass(frozen=True)
class FaceSpec:
    mode: str  # largest: one crop per image | all: one row per face
    fallback: str  # skip: an image without a face is recorded as skipped | whole: embed the whole image
    detector: str
    weights_sha256: str
    min_face: float = 0.1  # smallest face side, as a fraction of the image's shorter side (and >= 20 px)
    max_side: int = 1024  # detection runs on a copy at most this long (cost ~ pixels)
    margin: float = 0.2  # the crop adds this fraction of the face's side on every side (chin, brow, hair)
    max_faces: int = 32

    @classmethod
    def make(cls, mode: str, fallback: str = "skip") -> "FaceSpec | None":
        """The spec for --faces MODE --faces-fallback FALLBACK (None for off); checks both names."""
        if mode not in MODES:
            raise UserError(f"--faces {mode}: expected one of {', '.join(MODES)}")
        if fallback not in FALLBACKS:
            raise UserError(f"--faces-fallback {fallback}: expected one of {', '.join(FALLBACKS)}")
        if mode == "off":
            return None
        return cls(mode=mode, fallback=fallback, detector="mtcnn", weights_sha256=_weights_sha256())

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "FaceSpec":
        try:
            return cls(**d)
        except TypeError:
            raise UserError(f"face settings {sorted(d)} are not ones this imgsent knows (made by another version, "
                            "e.g. with the earlier OpenCV Haar detector?); re-extract the stores and retrain") from None


@functools.lru_cache(maxsize=1)
def _weights_sha256() -> str:
    try:
        return sha256_file(str(WEIGHTS))
    except OSError:
        raise UserError(f"{WEIGHTS}: the face detector's weights are missing; reinstall imgsent") from None


@functools.lru_cache(maxsize=2)
def _detector(sha256: str) -> MTCNN:
    """The detector, loaded once per process, after checking it is the file the fingerprint names."""
    if _weights_sha256() != sha256:  # a missing file is one line too, never a traceback
        raise UserError(f"{WEIGHTS}: these face-detector weights differ from the ones the store or model was made "
                        "with; install the same imgsent version, or re-extract")
    return MTCNN.load()


def detect(rgb: np.ndarray, spec: FaceSpec) -> list[Box]:
    """Faces in an RGB uint8 image (H, W, 3) as tight boxes, largest first."""
    h, w = rgb.shape[:2]
    scale = min(1.0, spec.max_side / max(h, w))
    small = rgb
    if scale < 1.0:  # (h', w', 3), box-filtered
        small = np.asarray(Image.fromarray(rgb).resize((max(1, round(w * scale)), max(1, round(h * scale))),
                                                       Image.BOX))
    side = max(20.0, spec.min_face * min(small.shape[:2]))
    found, _ = _detector(spec.weights_sha256).detect(small, min_face=side)  # (K, 4) x0 y0 x1 y1
    boxes = []
    for x0, y0, x1, y1 in found / scale:
        x, y = int(round(x0)), int(round(y0))
        bw, bh = int(round(x1)) - x, int(round(y1)) - y
        if bw > 0 and bh > 0:
            boxes.append((x, y, bw, bh))
    return sorted(boxes, key=lambda b: (-b[2] * b[3], b[0], b[1]))


def expand(box: Box, margin: float, width: int, height: int) -> Box:
    """The crop around a face: `margin` of its side added on every side, clipped to the image."""
    x, y, w, h = box
    x0, y0 = max(0, round(x - margin * w)), max(0, round(y - margin * h))
    x1, y1 = min(width, round(x + w + margin * w)), min(height, round(y + h + margin * h))
    return x0, y0, x1 - x0, y1 - y0


def face_boxes(rgb: np.ndarray, spec: FaceSpec) -> list[Box]:
    """Crop boxes to embed for one image: the largest face, or every face (at most max_faces, left to right),
    or the whole image when none is found and the fallback says so; [] means 'no face found'."""
    h, w = rgb.shape[:2]
    faces = detect(rgb, spec)[:1 if spec.mode == "largest" else spec.max_faces]
    if not faces:
        return [(0, 0, w, h)] if spec.fallback == "whole" else []
    crops = [expand(b, spec.margin, w, h) for b in faces]
    return sorted(crops, key=lambda b: (b[0], b[1]))


def with_faces(fingerprint: dict, spec: FaceSpec | None) -> dict:
    """A backbone's fingerprint plus the face settings its rows were cut with."""
    return {**fingerprint, "faces": spec.to_dict()} if spec is not None else fingerprint


def without_faces(fingerprint: dict) -> dict:
    """The backbone's own fingerprint (what the network and its ONNX export are checked against)."""
    return {k: v for k, v in fingerprint.items() if k != "faces"}


def spec_of(fingerprint: dict) -> FaceSpec | None:
    """The face settings a store or model fingerprint records (None: whole images)."""
    d = fingerprint.get("faces")
    return FaceSpec.from_dict(d) if d else None
