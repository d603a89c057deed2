"""imgsent's Python API under its own name (the code lives in the packages features/ and pipeline/):

    import imgsent
    imgsent.extract(images="photos/", out="photos.h5")                   # stage one: images -> feature store
    imgsent.train_head(stores=["photos.h5"], out="model", params=imgsent.load_params("params.yaml"))
    p = imgsent.load_model("model").predict(["new.jpg", "more/"])        # p.labels, p.probs, p.class_names

Names are imported on first use: `import imgsent` costs nothing until one is touched.
"""
from __future__ import annotations

import importlib

_WHERE = {
    "extract": "features.extract",
    "read_store": "features.storage.store",
    "load_params": "pipeline.params",
    "train_head": "pipeline.stages.train",
    "evaluate": "pipeline.stages.evaluate",
    "load_model": "pipeline.inference.predict",
    "Predictor": "pipeline.inference.predict",
    "Predictions": "pipeline.inference.predictions",
    "UserError": "features.errors",
}
__all__ = sorted(_WHERE)


def __dir__() -> list[str]:
    return __all__  # what `dir(imgsent)` and tab completion show, before anything is imported


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'imgsent' has no attribute {name!r}")
