"""What predict takes and gives: image paths from files and folders, the Predictions it returns, and the CSVs
it writes (checked before the work; written whole, the face-mode pair published together)."""
from __future__ import annotations

import contextlib
import csv
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from features.errors import UserError
from features.input.prefetch import resolve_workers
from features.input.files import unsupported, walk_images
from features.input.sources import discover
from features.storage.atomic import OutputLock, atomic_file, check_output
from features.models.engine import ENGINES
from features.text import plural, safe_text


@dataclass
class FaceRows:
    """Face mode: one entry per face crop, in image order."""
    image: np.ndarray  # (R,) index into Predictions.paths
    face: np.ndarray  # (R,) 0.. within the image (left to right)
    boxes: np.ndarray  # (R, 4) crop x, y, w, h in the upright image
    probs: np.ndarray  # (R, C) calibrated
    labels: list[str]  # as Predictions.labels, per face
    ood_scores: np.ndarray | None = None  # (R,)


@dataclass
class Predictions:
    paths: list[str]
    labels: list[str]  # predicted label; "" where the image failed, "unsure" below min_confidence or out of
    probs: np.ndarray  # (N, C) calibrated; NaN rows where the image failed             distribution
    errors: list[str]  # "" when fine
    class_names: list[str]
    seconds: float = 0.0
    ood_scores: np.ndarray | None = None  # (N,) k-NN distance to the training images (pipeline/inference/ood.py); NaN on
    ood_threshold: float | None = None  # failures; None for a model directory without ood.npz
    faces: FaceRows | None = None  # face mode: every face; then probs / ood_scores are the means over an image's faces
    ood_note: str = ""  # how the threshold was set when the training set was small (pipeline/inference/ood.py threshold)
    face_note: str = ""  # face mode `all`: images that reached the face limit (their other faces are not classified)
    sources: list[str] | None = None  # per image: the source it was adapted with ('' = on its own)
    adapted: list[str] | None = None  # per image: the transform its prediction rests on, or why none (heads/adapt.py)
    per_source: dict | None = None  # source -> its heads/sources.Adapted record (the images that were read)


FILES_NAMED = "(files named)"  # the source of the image files named on the command line, all together


def expand_paths(inputs: list[str]) -> tuple[list[str], dict[int, str], list[str]]:
    """Files, folders and CSV manifests -> image paths, {index: error} for files we cannot decode by type, and the
    source of each path: the folder argument it was found under, FILES_NAMED for a file named directly, or a
    manifest's group (else the manifest itself). A missing path, a folder without files or an image reached twice
    (a folder passed twice or inside another, a file named and found in a folder) is the user's mistake: one line,
    before any work (an image counted twice would weigh twice in its source's adaptation and in the summary)."""
    out: list[str] = []
    errors: dict[int, str] = {}
    sources: list[str] = []
    for p in inputs:
        path = Path(p)
        if path.is_dir():
            found, other, unread = walk_images(path)
            if not found and not other and not unread:
                raise UserError(f"{path}: folder holds no files; pass image files or folders of images")
            why = {q: unsupported(q) for q in other} | {q: reason for q, reason in unread}
            for q in sorted(found + list(why)):
                if q in why:
                    errors[len(out)] = why[q]
                out.append(str(q))
                sources.append(str(path))
        elif path.suffix.lower() == ".csv" and path.is_file():
            listed = discover(path, allow_outside=True)  # path[,label][,group]: labels are ignored here
            for it in listed.items:
                out.append(it.abspath)
                sources.append(it.group or str(path))
            for q, reason in listed.problems:
                errors[len(out)] = reason
                out.append(q)
                sources.append(str(path))
        elif path.exists() or path.is_symlink():
            out.append(str(path))  # unreadable or odd files surface as per-row errors, not a crash
            sources.append(FILES_NAMED)
        else:
            raise UserError(f"{path}: no such file or folder; pass image files, folders of images or a CSV manifest")
    if not out:
        raise UserError("no images given; pass image files or folders of images")
    used = [i for i in range(len(out)) if i not in errors]  # a row in error (a manifest's duplicate) is not read
    absolute = {i: os.path.abspath(out[i]) for i in used}
    if len(set(absolute.values())) < len(used):
        first: dict[str, int] = {}  # absolute path -> its first index in out
        twice = [(first[a], i) for i, a in absolute.items() if first.setdefault(a, i) != i]
        (j, i), more = twice[0], len(twice) - 1
        raise UserError(f"{out[i]}: given twice (from {sources[j]} and from {sources[i]})" +
                        (f", and {plural(more, 'other image')} too" if more else "") +
                        "; pass each image once: each is predicted once and counted once in its source's adaptation")
    return out, errors, sources


def _is_prediction_csv(p: Path) -> bool:
    try:
        with open(p, encoding="utf-8") as f:
            return f.readline().startswith(("path,predicted,", "path,label,confidence,"))
    except (OSError, UnicodeDecodeError):
        return False


def check_prediction_out(out: str | Path, faces: bool = True) -> Path:
    """The files predict may write, checked before any work: `out`, and its per-face companion for a face-mode
    model (`faces`). '-' is standard output (face mode then writes only the per-image rows)."""
    if str(out) == "-":
        return Path("-")
    if faces:
        check_output(faces_csv(out), folder=False, is_ours=_is_faces_csv, what="per-face predictions CSV")
    return check_output(out, folder=False, is_ours=_is_prediction_csv, what="predictions CSV")


def faces_csv(out: str | Path) -> Path:
    """Where predict writes one row per face in face mode: predictions.csv -> predictions.faces.csv."""
    out = Path(out)
    return out.with_name(f"{out.stem}.faces{out.suffix or '.csv'}")


def _is_faces_csv(p: Path) -> bool:
    try:
        with open(p, encoding="utf-8") as f:
            return f.readline().startswith("path,face,x,y,w,h,")
    except (OSError, UnicodeDecodeError):
        return False


def write_prediction_csv(out: str | Path, pred: Predictions) -> None:
    """path,predicted,confidence,ood_score,p_<class>...[,faces],source,adapted,error: one row per input, failures
    included; whole or not at all ('-': standard output). ood_score is empty for a model directory made before the
    out-of-distribution check existed. source and adapted: what each prediction was adapted with (heads/adapt.py).
    Face mode adds the number of faces per image, and faces_csv(out): path,face,x,y,w,h,predicted,confidence,
    ood_score,p_<class>... for every face crop (the image's row holds the mean of its faces' probabilities)."""
    if str(out) == "-":
        _write_rows(sys.stdout, pred)
        return
    fr = pred.faces
    # Face mode's two files are published together: both are written in full under temp names, then renamed
    # (the main CSV first, the per-face one right after); a failed write publishes neither.
    with OutputLock(out), contextlib.ExitStack() as both:
        if fr is not None:
            fscores = fr.ood_scores if fr.ood_scores is not None else np.full(len(fr.image), np.nan)
            with open(both.enter_context(atomic_file(faces_csv(out))), "w", newline="", encoding="utf-8") as f:
                w = csv.writer(f)
                w.writerow(["path", "face", "x", "y", "w", "h", "predicted", "confidence", "ood_score",
                            *[f"p_{c}" for c in pred.class_names]])
                for i, k, b, pr, lab, sc in zip(fr.image, fr.face, fr.boxes, fr.probs, fr.labels, fscores):
                    w.writerow([safe_text(pred.paths[i]), int(k), *[int(v) for v in b], lab, f"{pr.max():.6f}",
                                _num(sc), *[f"{q:.6f}" for q in pr]])
        with atomic_file(out) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
            _write_rows(f, pred)


def _num(x: float) -> str:
    return "" if np.isnan(x) else f"{x:.6f}"


def _write_rows(f, pred: Predictions) -> None:
    """The per-image CSV (write_prediction_csv) into the open text file f."""
    scores = pred.ood_scores if pred.ood_scores is not None else np.full(len(pred.paths), np.nan)
    names, fr = pred.class_names, pred.faces
    counts = np.bincount(fr.image, minlength=len(pred.paths)) if fr is not None else None
    sources = pred.sources or [""] * len(pred.paths)
    adapted = pred.adapted or [""] * len(pred.paths)
    w = csv.writer(f)
    w.writerow(["path", "predicted", "confidence", "ood_score", *[f"p_{c}" for c in names],
                *(["faces"] if fr is not None else []), "source", "adapted", "error"])
    for i, (p, lab, pr, err, sc) in enumerate(zip(pred.paths, pred.labels, pred.probs, pred.errors, scores)):
        nf = [int(counts[i])] if fr is not None else []
        src = [safe_text(sources[i]), adapted[i]]
        if err:
            w.writerow([safe_text(p), "", "", "", *[""] * len(names), *nf, *src, err])
        else:
            w.writerow([safe_text(p), lab, f"{pr.max():.6f}", _num(sc), *[f"{q:.6f}" for q in pr], *nf, *src, ""])


SOURCES = ("argument", "call", "none")
STORE_SUFFIXES = (".h5", ".hdf5")  # an input named so is a feature store (imgsent extract --out), not an image
CALL = "(this call)"  # the source name when every image of the call is adapted together


def check_predict_args(*, batch_size: int, workers: int | str, min_confidence: float, ood_quantile: float,
                       engine: str, source: str = "argument") -> None:
    """The predict options, checked before any model is loaded (the CLI) or any image read (the API)."""
    if source not in SOURCES:
        raise UserError(f"--source {source}: expected one of {', '.join(SOURCES)}")
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: need batch-size >= 1")
    resolve_workers(workers)
    if not 0.0 <= min_confidence <= 1.0:
        raise UserError(f"--min-confidence {min_confidence}: must be within [0, 1]")
    if not 0.0 < ood_quantile <= 1.0:
        raise UserError(f"--ood-quantile {ood_quantile}: must be within (0, 1]; 1 never flags an image")
    if engine not in ENGINES:
        raise UserError(f"--engine {engine}: expected one of {', '.join(ENGINES)}")


def image_sources(arg_sources: list[str], source: str) -> np.ndarray:
    """Each image's source as predict names it (the `source` column): its argument's (a folder, a manifest group,
    the files named), the call's, or '' for none (each image on its own)."""
    n = len(arg_sources)
    return np.asarray(arg_sources if source == "argument" else [CALL] * n if source == "call" else [""] * n, dtype=str)
