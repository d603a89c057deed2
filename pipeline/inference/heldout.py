"""A trained head on labelled held-out stores: their rows in the model's class order and the head's logits, each
source (the store's groups, else the whole store) adapted as the model's CV chose, for evaluate and the report.
Stores from other backbones or with classes the model does not know are refused."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from features.errors import UserError
from features.text import plural
from pipeline.data.rows import open_rows
from pipeline.heads.sources import Adapted, rows_logits
from pipeline.heads.head import Head
from pipeline.inference.modeldir import ModelInfo
from pipeline.inference.ood import trained_on

WHOLE_STORE = "(whole store)"  # the source name of a store without groups


def store_sources(rows) -> np.ndarray:
    """The source of each store row (N,) as predict would adapt it: its group, else the whole store."""
    return np.asarray(rows.groups if rows.groups is not None else [WHOLE_STORE] * len(rows), dtype=str)


@dataclass
class Heldout:
    """The labelled rows of held-out store(s)."""
    paths: list[str]
    labels: np.ndarray  # (N,) in the model's class order
    logits: np.ndarray  # (N, C) uncalibrated, adapted per source
    root: str  # where the paths start
    faces: dict[str, list]  # face mode: face,x,y,w,h per row; else {}
    sources: list[str]  # per row: its source (a group, or WHOLE_STORE)
    adapted: list[str]  # per row: what its prediction rests on (heads/sources.Adapted.word)
    per_source: dict[str, Adapted]  # source -> that
    trained_on: int = 0  # labelled images of the stores the model was trained on: left out of every row above

    def trained_note(self) -> str:
        """The words for the images left out, or '' for none."""
        return (f"{plural(self.trained_on, 'image')} the model was trained on left out" if self.trained_on else "")


def heldout_logits(*, head: Head, info: ModelInfo, stores: list[str], model_dir: str | Path) -> Heldout:
    """Labelled rows of held-out store(s), adapted per source by the model's transform. Refuses stores from other
    backbones or with unknown classes. The images the model was trained on (ood.npz's `seen`) are not held out:
    they are left out, before adaptation (Heldout.trained_on counts them), and a store of nothing else is refused."""
    names = info.class_names
    rows = open_rows(stores, expect=info.backbones, intersect=True, memory_budget_mb=info.memory_budget_mb)
    labels = rows.labels
    if rows.class_names != names:
        # Labels are indices into the store's class list; map them by name onto the model's.
        unknown = sorted(set(rows.class_names) - set(names))
        if unknown:
            raise UserError(f"{stores[0]}: class {unknown[0]!r} is not one the model knows ({', '.join(names)}); "
                            "evaluate on images of the trained classes")
        remap = np.array([names.index(c) for c in rows.class_names] + [-1])
        labels = remap[labels]  # -1 stays -1 via the last entry
    lab = labels >= 0
    if not lab.any():
        raise UserError(f"{stores[0]}: no labelled images to evaluate on; use `imgsent predict` for unlabelled ones")
    trained, n_trained = trained_on(Path(model_dir), info.ood, rows.sha256, lab)  # (N,) bool, images
    if not (lab & ~trained).any():  # every labelled row is a training image
        raise UserError(f"{stores[0]}: all {plural(n_trained, 'labelled image')} in it are images the model was "
                        "trained on, so none is held out; evaluate on images it has not seen (train-head's "
                        "cross-validation already scores its training images held out by fold)")
    lab &= ~trained
    sources = store_sources(rows)
    logits, adapted, per_source = rows_logits(head, rows, lab, sources, info.adapt)
    return Heldout([p for p, k in zip(rows.paths, lab) if k], labels[lab], logits, rows.root, rows.face_columns(lab),
                   sources[lab].tolist(), adapted, per_source, n_trained)

