"""Face mode's detector: how many faces it finds on real photos that ship in installed packages, at what cost
per image, side by side with OpenCV's Haar cascade alt2 (the detector before issue #22) where an OpenCV 4.x with
its cascades is installed, and what face mode adds to an extraction. Ratios and counts only; absolute times
drift on shared machines.

    python benchmarks/face_detect.py      # imgsent's MTCNN; + Haar rows with pip install 'opencv-python-headless<5'

Photos: scikit-image's astronaut (1 face) and camera (1 man, three-quarter view), matplotlib's grace_hopper
(1 face), a canvas with two pasted heads, scikit-learn's china/flower and scikit-image's coffee/chelsea/rocket
(no person), and scikit-image's lfw_subset: 100 LFW faces and 100 non-faces, 25 px, shown at 100 px.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "tests")]
from faces_data import astronaut, canvas, grace, head, no_face  # noqa: E402
from features.models.faces import FaceSpec, detect  # noqa: E402


def photos() -> dict[str, tuple[np.ndarray, int]]:
    import skimage.data as sd
    two, _ = canvas([(head("astronaut"), 50, 50, 1.0), (head("grace"), 550, 100, 1.0)])
    return {"astronaut": (astronaut(), 1), "grace_hopper": (grace(), 1),
            "camera (3/4 view)": (np.stack([sd.camera()] * 3, -1), 1), "two-head canvas": (two, 2),
            "china": (no_face("china.jpg"), 0), "flower": (no_face("flower.jpg"), 0), "coffee": (sd.coffee(), 0),
            "chelsea (cat)": (sd.chelsea(), 0), "rocket": (sd.rocket(), 0)}


def lfw() -> list[np.ndarray]:
    import skimage.data as sd
    x = np.load(os.path.join(os.path.dirname(sd.__file__), "lfw_subset.npy"))  # (200, 25, 25) in [0, 1]
    return [np.stack([np.array(Image.fromarray((a * 255).astype(np.uint8)).resize((100, 100)))] * 3, -1) for a in x]


def canvases(n: int = 30) -> list[np.ndarray]:
    """A head (astronaut or Grace Hopper) at a random place and scale 0.4-1.0 on a 1000 x 600 background (flat,
    china, flower): exactly one face each."""
    rng = np.random.default_rng(0)
    backgrounds = [None, no_face("china.jpg"), no_face("flower.jpg")]
    return [canvas([(head(name), int(rng.integers(0, 500)), int(rng.integers(0, 150)), float(rng.uniform(0.4, 1.0)))],
                   background=backgrounds[t % 3])[0] for name in ("astronaut", "grace") for t in range(n)]


def haar(cascade: str = "haarcascade_frontalface_alt2.xml", equalize: bool = True):
    """The previous detector (OpenCV 4.x's bundled Haar cascade, settings as imgsent used them), or None."""
    try:
        import cv2
        clf = cv2.CascadeClassifier(os.path.join(cv2.data.haarcascades, cascade))
    except (ImportError, AttributeError):
        return None
    cv2.setNumThreads(1)

    def run(rgb: np.ndarray) -> list:
        h, w = rgb.shape[:2]
        scale = min(1.0, 1024 / max(h, w))
        grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        if scale < 1.0:
            grey = cv2.resize(grey, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
        if equalize:
            grey = cv2.equalizeHist(grey)
        side = max(20, int(0.1 * min(grey.shape)))
        return list(np.asarray(clf.detectMultiScale(grey, 1.1, 5, minSize=(side, side))).reshape(-1, 4))
    return run


def timed(fn, images: list[np.ndarray], repeat: int = 3) -> float:
    fn(images[0])
    t = time.perf_counter()
    for _ in range(repeat):
        for im in images:
            fn(im)
    return (time.perf_counter() - t) / (repeat * len(images)) * 1e3


def main() -> None:
    torch.set_num_threads(1)  # one image per worker, as extraction runs detection
    spec = FaceSpec.make("all")
    detectors = {"mtcnn (imgsent)": lambda im: detect(im, spec)}
    for name, det in {"opencv haar alt2 (before)": haar(),
                      "opencv haar alt2, no equalizeHist": haar(equalize=False)}.items():
        if det is not None:
            detectors[name] = det
    ph, faces, pasted = photos(), lfw(), canvases()
    big, _ = canvas([(head("astronaut"), 300, 200, 3.0), (head("grace"), 2000, 300, 2.5)], size=(3200, 2000))
    print(f"{'detector':26s} " + " ".join(f"{k[:10]:>10s}" for k in ph) + "  LFW faces  LFW non  canvases 1 face"
          "  ms@512  ms@3200x2000")
    for name, fn in detectors.items():
        found = [len(fn(im)) for im, _ in ph.values()]
        hits = [len(fn(im)) > 0 for im in faces]
        one = sum(len(fn(im)) == 1 for im in pasted)
        print(f"{name:26s} " + " ".join(f"{f:>6d} of {want}" for f, (_, want) in zip(found, ph.values()))
              + f"  {sum(hits[:100]):5d}/100  {sum(hits[100:]):4d}/100  {one:9d}/{len(pasted)}"
              + f"  {timed(fn, [astronaut(), grace()]):6.0f}"
              + f"  {timed(fn, [big], 2):12.0f}")
    if len(detectors) == 1:
        print("opencv haar: not measured (needs opencv-python-headless < 5, whose wheels ship the cascades)")
    extraction_cost()


def extraction_cost(n: int = 24) -> None:
    """Extract fer_mini_xception and efficientnet_lite0 over n photo-sized (1000 x 600) canvases, whole vs faces."""
    from features.extract import extract
    with tempfile.TemporaryDirectory() as d:
        root = Path(d) / "imgs" / "people"
        root.mkdir(parents=True)
        rng = np.random.default_rng(0)
        for i in range(n):
            im, _ = canvas([(head(["astronaut", "grace"][i % 2]), int(rng.integers(0, 500)), int(rng.integers(0, 150)),
                             float(rng.uniform(0.8, 1.0)))], background=[None, no_face("china.jpg")][i % 2])
            Image.fromarray(im).save(root / f"{i}.jpg", quality=92)
        for backbone in ("fer_mini_xception", "efficientnet_lite0"):
            cells = []
            for faces in ("off", "all"):
                extract(images=str(Path(d) / "imgs"), out=f"{d}/warm.h5", backbone=backbone, faces=faces,
                        progress=False, force=True)  # export cache, imports
                s = extract(images=str(Path(d) / "imgs"), out=f"{d}/{backbone}-{faces}.h5", backbone=backbone,
                            faces=faces, progress=False, workers=1)
                cells.append(s.embed_seconds / n * 1e3)
            print(f"extract {backbone:20s} whole {cells[0]:6.1f} ms/img, --faces all {cells[1]:6.1f} ms/img "
                  f"({cells[1] / cells[0]:.1f}x)")


if __name__ == "__main__":
    main()
