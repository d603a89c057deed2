"""`imgsent suggest`: which unlabelled images to label next. The most uncertain first (smallest margin between
the two likeliest calibrated classes), but never two near-identical picks: a candidate whose features have cosine
>= `max_similarity` with an image already picked is passed over (fifty shots of one scene teach the head once).

    rank,path,predicted,confidence,margin,ood_score,p_<class>...      to_label.csv, best first
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from features.storage.atomic import OutputLock, atomic_file, check_output
from features.errors import UserError
from features.text import plural, safe_text
from pipeline.heads.head import softmax
from pipeline.heads.sources import rows_logits, sources_note
from pipeline.inference.heldout import store_sources
from pipeline.inference.modeldir import load_model_dir
from pipeline.inference.ood import load_ood, normalise, rows_distance, trained_on
from pipeline.data.rows import image_means, open_rows


def _is_suggestion_csv(p) -> bool:
    try:
        with open(p, encoding="utf-8") as f:
            return f.readline().startswith("rank,path,predicted,")
    except (OSError, UnicodeDecodeError):
        return False


def pick(*, probs: np.ndarray, features, n: int, max_similarity: float = 0.95, chunk: int = 1024) -> np.ndarray:
    """Row indices to label, in order: by margin (p1 - p2) ascending, skipping near-duplicates of earlier picks.
    probs (N, C) calibrated; features: unit rows (N, D), or a function giving the unit rows of some indices in
    their order (a streamed store: only the candidates looked at are read, `chunk` at a time)."""
    unit_of = features if callable(features) else (lambda idx: features[idx])
    top2 = np.sort(probs, axis=1)[:, -2:]  # (N, 2)
    order = np.argsort(top2[:, 1] - top2[:, 0], kind="stable")
    chosen: list[int] = []
    kept: list[np.ndarray] = []  # the chosen rows' unit features (D,)
    for c in range(0, len(order), chunk):
        idx = order[c:c + chunk]
        for i, f in zip(idx, unit_of(idx)):
            if len(chosen) == n:
                return np.array(chosen, dtype=np.int64)
            if kept and float((np.stack(kept) @ f).max()) >= max_similarity:
                continue
            chosen.append(int(i))
            kept.append(f)
    return np.array(chosen, dtype=np.int64)


def sure_note(confidence: np.ndarray, sure: float = 0.99) -> str:
    """When even the least confident pick is near certain, "most uncertain first" would mislead: say so."""
    if len(confidence) and float(confidence.min()) >= sure:
        return (f"; but the head is at least {float(confidence.min()):.4f} sure of every one of them, so labelling "
                "them teaches it little (ood_score says which are unlike the training images)")
    return ""


def suggest(*, model_dir: str, stores: list[str], out: str, n: int = 50, max_similarity: float = 0.95,
            progress=print) -> list[str]:
    """Write the `n` unlabelled images most worth labelling to `out`; returns their paths."""
    if n < 1:
        raise UserError(f"--n {n}: must be >= 1 (images to suggest)")
    if not 0 < max_similarity <= 1:
        raise UserError(f"--max-similarity {max_similarity}: must be within (0, 1]")
    check_output(out, folder=False, is_ours=_is_suggestion_csv, what="suggestions CSV")
    head, info = load_model_dir(model_dir)
    rows = open_rows(stores, expect=info.backbones, intersect=True, memory_budget_mb=info.memory_budget_mb)
    todo = rows.labels < 0
    if not todo.any():
        raise UserError(f"{stores[0]}: every image is labelled; extract a folder without class sub-folders (or a "
                        "CSV without a label column) to get suggestions")
    known, n_known = trained_on(Path(model_dir), info.ood, rows.sha256, todo)  # labelled already: in training
    if not (todo & ~known).any():  # every unlabelled row is a training image
        raise UserError(f"{stores[0]}: all {plural(n_known, 'unlabelled image')} in it are images the model was "
                        "trained on, labelled already; extract the images still to label")
    todo &= ~known
    ref = load_ood(Path(model_dir), info.ood, info.dim)[0] if info.ood else None
    # as predict would: each source (the store's groups, else the whole store) adapted by the model's transform
    logits, _, per_source = rows_logits(head, rows, todo, store_sources(rows), info.adapt)
    probs = softmax(logits, info.temperature)  # (M, C) calibrated
    ood = rows_distance(rows, todo, ref)  # (M,) how unlike the training images each unlabelled row is
    paths = [p for p, t in zip(rows.paths, todo) if t]
    where = np.flatnonzero(todo)  # (M,) store row of each unlabelled row

    def unit_of(idx: np.ndarray) -> np.ndarray:  # unit features of unlabelled rows idx, in idx's order
        mask = np.zeros(len(rows), bool)
        mask[where[idx]] = True
        x = normalise(rows.take(mask))  # in row order
        return x[np.argsort(np.argsort(where[idx]))]

    features = unit_of
    if rows.face_index is not None:  # face mode: one row per face; a user labels images, so rank images
        unit = unit_of(np.arange(len(paths)))  # (M, D): face-mode stores are read whole here
        first, (probs, unit, ood) = image_means(paths, probs, unit, ood[:, None])
        features, ood, paths = unit / np.linalg.norm(unit, axis=1, keepdims=True), ood[:, 0], [paths[i] for i in first]
    chosen = pick(probs=probs, features=features, n=n, max_similarity=max_similarity)
    top2 = np.sort(probs, axis=1)[:, -2:]
    with OutputLock(out), atomic_file(out) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["rank", "path", "predicted", "confidence", "margin", "ood_score",
                    *[f"p_{c}" for c in info.class_names]])
        for rank, i in enumerate(chosen, 1):
            w.writerow([rank, safe_text(paths[i]), info.class_names[int(probs[i].argmax())], f"{probs[i].max():.6f}",
                        f"{top2[i, 1] - top2[i, 0]:.6f}", "" if np.isnan(ood[i]) else f"{ood[i]:.6f}",
                        *[f"{q:.6f}" for q in probs[i]]])
    progress(f"{out}: {len(chosen)} of {len(paths)} unlabelled images to label next, most uncertain first"
             f"{'' if len(chosen) == n else f' (the others are near-duplicates of these at cosine >= {max_similarity})'}"
             f"{sure_note(probs[chosen].max(1))}; {sources_note(per_source)}" +
             (f"; {plural(n_known, 'image')} the model was trained on skipped" if n_known else ""))
    return [paths[i] for i in chosen]
