"""What predict says on the terminal: a line per image when no CSV is asked for, and the one summary line (images,
failures, images unlike the training ones, what was adapted over which sources)."""
from __future__ import annotations

from collections import Counter

from features.errors import short_reason
from features.text import plural, safe_text
from pipeline.heads.sources import sources_note
from pipeline.inference.predictions import Predictions, faces_csv


def label_lines(pred: Predictions) -> list[str]:
    """'path: label (confidence 0.93)' per image; a failed image gets its error."""
    out = []
    for i, (p, lab, err) in enumerate(zip(pred.paths, pred.labels, pred.errors)):
        if err:
            out.append(safe_text(f"{p}: failed: {err}"))
            continue
        far = pred.ood_scores is not None and pred.ood_scores[i] > pred.ood_threshold
        out.append(safe_text(f"{p}: {lab} (confidence {pred.probs[i].max():.2f}"
                             f"{', unlike the training images' if far else ''})"))
    return out


def adaptation_note(pred: Predictions) -> str:
    """'2 sources adapted (affine); 1 source too small to adapt (3 images < 5)', or why nothing was adapted."""
    if not pred.sources or not any(pred.sources):
        return "each image on its own (--source none)"
    per_source = pred.per_source or {}
    note = sources_note(per_source)
    if any(a.transform is not None for a in per_source.values()):  # said once: a label there rests on its neighbours
        note += (" (an adapted image's label depends on the other images passed with it; --source none labels each "
                 "image on its own)")
    return note


def summary_line(pred: Predictions, out: str | None) -> str:
    bad = Counter(short_reason(e) for e in pred.errors if e)  # short reasons; the CSV has them all
    failed = f"{sum(bad.values())} failed" + (" (" + "; ".join(f"{n} x {why}" for why, n in bad.most_common(3)) + ")"
                                              if bad else "")
    n = len(pred.paths)
    rate = f" ({n / pred.seconds:.1f} img/s)" if pred.seconds > 0 and n >= 20 else ""
    far = "" if pred.ood_scores is None else \
        f", {int((pred.ood_scores > pred.ood_threshold).sum())} unlike the training images (labelled unsure)" + \
        (f" [{pred.ood_note}]" if pred.ood_note else "")
    faces = "" if pred.faces is None else (
        f", {plural(len(pred.faces.image), 'face')}" + (f" (one row each in {faces_csv(out)})" if out and out != "-"
                                                        else " (per face: pass --out FILE)")
        + (f" [{pred.face_note}]" if pred.face_note else ""))
    return (f"{out if out and out != '-' else 'predict'}: {plural(n, 'image')}{faces}, {failed}{far}; "
            f"{adaptation_note(pred)}; in {pred.seconds:.1f} s{rate}")
