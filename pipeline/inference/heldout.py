"""A trained head on labelled held-out stores: their rows in the model's class order and the head's logits, for
evaluate and the report. Stores from other backbones or with classes the model does not know are refused."""
from __future__ import annotations

import numpy as np

from features.errors import UserError
from pipeline.analysis.metrics import face_columns
from pipeline.data.rows import open_rows
from pipeline.heads.head import Head, head_logits
from pipeline.inference.modeldir import ModelInfo


def heldout_logits(*, head: Head, info: ModelInfo, stores: list[str]
                   ) -> tuple[list[str], np.ndarray, np.ndarray, str, dict[str, list]]:
    """Labelled rows of held-out store(s) -> (paths, labels in the model's class order (N,), uncalibrated
    logits (N, C), image root, face columns (face,x,y,w,h per row in face mode, else {})). Refuses stores from
    other backbones or with unknown classes."""
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
    logits = head_logits(head, rows, lab)
    return ([p for p, k in zip(rows.paths, lab) if k], labels[lab], logits, rows.root,
            face_columns(rows.face_index, rows.face_boxes, lab))
