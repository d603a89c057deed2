"""Real photos of people that ship in packages imgsent's tests already install, and canvases built from them.

    astronaut(): scikit-image's data.astronaut() (Eileen Collins, NASA, public domain), one face at ASTRONAUT_FACE
    grace(): matplotlib's sample_data/grace_hopper.jpg (US Navy, public domain), one face
    no_face(): scikit-learn's sample photos china.jpg / flower.jpg (no person)
    canvas(...): faces pasted at chosen places and scales into a photo-sized background, with where they went
"""
from __future__ import annotations

import os

import numpy as np
from PIL import Image

ASTRONAUT_FACE = (177, 66, 95, 95)  # x, y, w, h: checked by eye on the 512 x 512 image (brow to chin)
HEADS = {"astronaut": (110, 0, 230, 300), "grace": (60, 40, 400, 400)}  # head-and-shoulders regions (x, y, w, h)


def astronaut() -> np.ndarray:
    import skimage.data
    return skimage.data.astronaut()  # (512, 512, 3) uint8


def grace() -> np.ndarray:
    import matplotlib
    path = os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")
    return np.array(Image.open(path).convert("RGB"))  # (600, 512, 3)


def no_face(name: str = "china.jpg") -> np.ndarray:
    from sklearn.datasets import load_sample_image
    return load_sample_image(name)  # (427, 640, 3)


def head(name: str) -> np.ndarray:
    x, y, w, h = HEADS[name]
    return (astronaut() if name == "astronaut" else grace())[y:y + h, x:x + w]


def canvas(pastes: list[tuple[np.ndarray, int, int, float]], size: tuple[int, int] = (1000, 600),
           background: np.ndarray | None = None) -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
    """Paste (patch, x, y, scale) into a background of `size` (w, h); returns the image and each paste's
    rectangle (x, y, w, h) in it."""
    w, h = size
    bg = np.full((h, w, 3), 190, np.uint8) if background is None else \
        np.array(Image.fromarray(background).resize((w, h)))
    out, rects = bg.copy(), []
    for patch, x, y, scale in pastes:
        ph, pw = patch.shape[:2]
        p = np.array(Image.fromarray(patch).resize((round(pw * scale), round(ph * scale)), Image.BILINEAR))
        out[y:y + p.shape[0], x:x + p.shape[1]] = p
        rects.append((x, y, p.shape[1], p.shape[0]))
    return out, rects


def iou(a, b) -> float:
    """Intersection over union of two (x, y, w, h) boxes."""
    ix = max(0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / float(a[2] * a[3] + b[2] * b[3] - inter) if inter else 0.0
