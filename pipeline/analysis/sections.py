"""The report's sections about the training data, from the training store and the out-of-fold predictions:
suspected label errors, near-duplicates and the closest pairs across folds, the learning curve, a feature map;
each writes its CSV and figure beside the page. A section that cannot be built says why."""
from __future__ import annotations

import csv
import dataclasses
import html
from pathlib import Path

import numpy as np

from features.errors import UserError
from pipeline.analysis.html import Split, card, figure
from pipeline.analysis.insight import (closest_across_folds, embedding_2d, label_issues, learning_curve,
                                      near_duplicates)
from pipeline.analysis.plots import plot_embedding, plot_learning_curve
from pipeline.data.rows import open_rows
from pipeline.inference.modeldir import ModelInfo
from pipeline.params import parse_params


def _training_rows(info: ModelInfo, oof: Split):
    """The training store's rows and the row of each out-of-fold prediction, or (None, None, why not)."""
    try:
        rows = open_rows(info.stores, expect=info.backbones, intersect=True,
                         memory_budget_mb=info.memory_budget_mb)
    except UserError as err:
        return None, None, f"the training store cannot be read ({err})"
    if not rows.in_memory:
        return None, None, "the training features exceed the memory budget; these checks need them in memory"
    face = rows.face_index if rows.face_index is not None else np.zeros(len(rows), np.int64)
    idx = {(p, int(k)): i for i, (p, k) in enumerate(zip(rows.paths, face))}
    at = [idx.get((p, int(k))) for p, k in zip(oof.paths, oof.face if oof.face is not None else [0] * len(oof.paths))]
    if any(i is None for i in at) or rows.class_names != info.class_names:
        return None, None, ("the training store no longer holds the images and classes the model was trained on "
                            "(re-extracted since?); re-run train-head")
    return rows, np.array(at), ""


def _label_issue_section(oof: Split, names: list[str], d: Path, gallery: int) -> tuple[str, np.ndarray]:
    idx, suggested, score = label_issues(labels=oof.y, probs=oof.probs)
    with open(d / "label_issues.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "suggested", "score"])
        w.writerows([oof.paths[i], names[oof.y[i]], names[s], f"{p:.6f}"] for i, s, p in zip(idx, suggested, score))
    parts = [f"<h3>Suspected label errors ({len(idx)})</h3><p>Confident learning (cleanlab) on the out-of-fold "
             "probabilities: images whose label disagrees with what the model learnt from all the others, worst "
             "first, with the label it suggests. Check these first; all of them are in <code>label_issues.csv"
             "</code>.</p><div class=gallery id=label-issues>"]
    for i, s in list(zip(idx, suggested))[:gallery]:
        parts.append(card(oof, names, i, int(s), float(oof.probs[i, oof.y[i]]), word="suggested"))
    return "\n".join(parts + ["</div>"]), idx


def _near_duplicate_section(rows, at, oof: Split) -> tuple[str, int, list[tuple[int, int]]]:
    e = html.escape
    found = near_duplicates(rows.features[at], oof.fold)
    pair = lambda i, j, s: f"<li><code>{e(oof.paths[i])}</code> ~ <code>{e(oof.paths[j])}</code> ({s:.3f})</li>"  # noqa: E731
    page = ("<h3>Near-duplicates in different folds</h3><p>Pairs of images whose features have cosine similarity "
            "&ge; 0.97 (re-encodes, resizes, small edits) that sat on both sides of a CV split inflate CV scores: put "
            "them in one <code>group</code> in the manifest. This cannot see crops of one photo, burst shots or frames "
            "of one video, which differ more; the most similar pairs below are where to look for them.</p>")
    page += ("<ol id=near-duplicates>" + "".join(pair(i, j, s) for i, j, s in found) + "</ol>" if found else
             "<p>None found (cosine &ge; 0.97).</p>")
    page += ("<h4>The most similar pairs in different folds, however similar</h4><ol id=closest-pairs>"
             + "".join(pair(i, j, s) for i, j, s in closest_across_folds(rows.features[at], oof.fold)) + "</ol>")
    return page, len(found), [(i, j) for i, j, _ in found]


def _learning_curve_section(rows, at, oof: Split, info: ModelInfo, d: Path) -> tuple[str, list[dict]]:
    fold = np.full(len(rows), -1)
    fold[at] = oof.fold
    labels = np.full(len(rows), -1)
    labels[at] = oof.y  # only the images the model was trained on
    points = learning_curve(rows=dataclasses.replace(rows, labels=labels), fold=fold,
                            params=parse_params(info.params, "model.json params"), max_val=None)
    with open(d / "learning_curve.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["per_class", "macro_f1", "lo", "hi"])
        w.writerows([p["per_class"], f"{p['macro_f1']:.4f}", f"{p['lo']:.4f}", f"{p['hi']:.4f}"] for p in points)
    plot_learning_curve(points, d / "learning_curve.png")
    gain = points[-1]["macro_f1"] - points[-2]["macro_f1"] if len(points) > 1 else 0.0
    verdict = learning_verdict(points[-1]["macro_f1"], gain)
    return ("<h3>Learning curve</h3><p>Macro-F1 under the same cross-validation with every class cut to at most "
            f"N training images (95% interval over folds). From the last step to all images: {gain:+.3f}, "
            f"{verdict}.</p>" + figure(d / "learning_curve.png", "learning curve")), points


def learning_verdict(last: float, gain: float) -> str:
    """What the learning curve's end says: at the ceiling (CV macro-F1 >= 0.995: more of the same cannot show a
    gain), still rising (gained > 0.02 over the last step), or flat."""
    if last >= 0.995:
        return (f"at the ceiling: CV already scores {last:.3f}, so more images of the same kind cannot show a gain; "
                "test on a source the model has not seen (a new style, camera or person) instead")
    if gain > 0.02:
        return "still rising: more labelled images per class should help"
    return ("flat at the end: more images of the same kind will help little; look at the label errors and the "
            "most-confused pairs instead")


def _embedding_section(rows, at, oof: Split, names: list[str], issues: np.ndarray, pairs, d: Path) -> str:
    xy = embedding_2d(rows.features[at])
    pred = oof.probs.argmax(1)
    flagged = np.zeros(len(at), bool)
    flagged[issues] = True
    with open(d / "embedding_2d.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path", "x", "y", "label", "predicted", "label_issue"])
        w.writerows([p, f"{a:.5f}", f"{b:.5f}", names[t], names[q], int(g)]
                    for p, (a, b), t, q, g in zip(oof.paths, xy, oof.y, pred, flagged))
    plot_embedding(xy, oof.y, names, pred != oof.y, issues, pairs, d / "embedding.png")
    return ("<h3>Map of the training features</h3><p>The first two principal components of the standardised "
            "features (embedding_2d.csv): colour = label, x = misclassified out of fold, ring = suspected label "
            f"error{', grey ring = near-duplicates split across folds' if len(pairs) else ''}. Classes that overlap "
            "here are the ones the head confuses.</p>" + figure(d / "embedding.png", "embedding map"))


def insight_sections(info: ModelInfo, oof: Split, names: list[str], d: Path, gallery: int) -> tuple[list[str], dict]:
    body, issues = _label_issue_section(oof, names, d, gallery)
    sections, result = [body], {"label_issues": int(len(issues))}
    rows, at, why = _training_rows(info, oof)
    if rows is None:
        return sections + [f"<h3>Near-duplicates, learning curve, feature map</h3><p class=note>Skipped: "
                           f"{html.escape(why)}.</p>"], result
    body, result["near_duplicates_across_folds"], pairs = _near_duplicate_section(rows, at, oof)
    sections.append(body)
    body, result["learning_curve"] = _learning_curve_section(rows, at, oof, info, d)
    sections += [body, _embedding_section(rows, at, oof, names, issues, pairs, d)]
    return sections, result
