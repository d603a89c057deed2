"""Error-analysis report: one self-contained HTML page (thumbnails inlined, no server, no network) plus
confusion.png, reliability.png and the CSVs DVC plots read. The same page from any working directory:
store paths and the image root come from model.json, absolute; a section that cannot be built says why.

Sections: headline metrics with bootstrap 95% CIs, per-class table, confusion matrix (counts and
row-normalised), most-confused pairs, misclassified gallery sorted by loss; then, for the training data,
suspected label errors with a suggested label (label_issues.csv), near-duplicates that fell into different CV
folds, a learning curve (learning_curve.csv) and a 2-D map of the features (embedding_2d.csv). Built from the
out-of-fold predictions of the training store and, when a test store is given, from the model's predictions.
"""
from __future__ import annotations

import csv
import html
import json
import zipfile
from pathlib import Path

import numpy as np

from features.storage.atomic import atomic_dir, check_output, holds_only
from features.errors import UserError
from features.text import plural
from pipeline.heads.sources import sources_note
from pipeline.inference.heldout import heldout_logits
from pipeline.heads.head import softmax
from pipeline.analysis.metrics import classification_metrics, expected_calibration_error, per_image_metrics, write_confusion
from pipeline.inference.modeldir import ModelInfo, load_model_dir
from pipeline.analysis.html import CSS, Split, card, figure
from pipeline.analysis.noise import bootstrap_ci
from pipeline.analysis.sections import insight_sections
from pipeline.analysis.plots import plot_confusion, plot_reliability


def _oof_split(model_dir: Path, info: ModelInfo) -> Split:
    """Out-of-fold predictions: logits from oof_logits.npy (calibrated with the model's temperature), paths,
    true labels and folds from oof_predictions.csv; both checked against each other."""
    names = info.class_names
    f, z = model_dir / "oof_predictions.csv", model_dir / "oof_logits.npy"
    if not f.is_file() or not z.is_file():
        raise UserError(f"{model_dir}: no oof_predictions.csv / oof_logits.npy; re-run imgsent train-head")
    try:
        with open(f, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        y = np.array([names.index(r["label"]) for r in rows], dtype=np.int64)
        fold = np.array([int(r["fold"]) for r in rows])
        faced = bool(rows) and "face" in rows[0]
        face = np.array([int(r["face"]) for r in rows], dtype=np.int64) if faced else None
        boxes = np.array([[int(r[k]) for k in "xywh"] for r in rows], dtype=np.int64).reshape(-1, 4) if faced else None
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{f}: damaged (unreadable rows, unknown labels or no fold column); re-run imgsent train-head") from None
    try:
        logits = np.load(z, allow_pickle=False)  # (N, C); an .npz archive or a broken file is not one
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        logits = None
    if not isinstance(logits, np.ndarray) or logits.shape != (len(rows), len(names)) or \
            not np.isfinite(logits).all():
        raise UserError(f"{z}: damaged, or not the {len(rows)} rows x {len(names)} classes of oof_predictions.csv; "
                        "re-run imgsent train-head")
    return Split("cross-validation (out-of-fold)", [r["path"] for r in rows], y, softmax(logits, info.temperature),
                 info.image_root, fold, boxes, face)


def _section(split: Split, names: list[str], out: Path, slug: str, gallery: int) -> tuple[str, dict]:
    """One split's part of the page: its scores, its figures (written beside the page), its errors; and the
    numbers summary.json records for it."""
    pred = split.probs.argmax(1)  # (N,)
    m = classification_metrics(split.y, pred, names)
    ci = bootstrap_ci(split.y, pred, len(names))
    cm = np.zeros((len(names), len(names)), dtype=np.int64)  # (C, C) actual x predicted
    np.add.at(cm, (split.y, pred), 1)
    plot_confusion(cm, names, out / f"confusion_{slug}.png")
    plot_reliability(split.probs, split.y, out / f"reliability_{slug}.png")
    write_confusion(out / f"confusion_{slug}.csv", split.y, pred, names)  # a row per image: DVC's confusion plot
    with open(out / f"confusion_matrix_{slug}.csv", "w", newline="", encoding="utf-8") as f:  # the matrix itself
        w = csv.writer(f)
        w.writerow(["actual \\ predicted", *names])
        w.writerows([names[i], *cm[i].tolist()] for i in range(len(names)))
    page = (_scores_html(split, names, m, ci) +
            figure(out / f"confusion_{slug}.png", "confusion matrix", f"id=confusion-{slug} ") +
            figure(out / f"reliability_{slug}.png", "reliability diagram") + "\n" +
            _errors_html(split, names, cm, pred, slug, gallery))
    summary = {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "accuracy_ci95": ci["accuracy"],
               "macro_f1_ci95": ci["macro_f1"], "n": m["n"], "misclassified": int((pred != split.y).sum())}
    return page, summary


def _scores_html(split: Split, names: list[str], m: dict, ci: dict) -> str:
    """The headline (with bootstrap 95% intervals), face mode's per-image line, the per-class table."""
    e = html.escape
    parts = [f"<h2>{e(split.name)}</h2>",
             f"<p class=headline>accuracy <b>{m['accuracy']:.3f}</b> (95% CI {ci['accuracy'][0]:.3f}–{ci['accuracy'][1]:.3f})"
             f" · macro-F1 <b>{m['macro_f1']:.3f}</b> (95% CI {ci['macro_f1'][0]:.3f}–{ci['macro_f1'][1]:.3f})"
             f" · balanced accuracy {m['balanced_accuracy']:.3f} · {plural(m['n'], 'image')} · ECE "
             f"{expected_calibration_error(split.probs, split.y):.3f}</p>"]
    if split.fold is not None and m["accuracy"] == 1.0:  # a perfect CV score is more often a leak than a fact
        parts.append("<p class=note>Every image right in cross-validation. Before trusting it, check that no image "
                     "has a copy, crop or shot of the same scene in another fold (the pairs below) and give such "
                     "images one <code>group</code>.</p>")
    if split.face is not None:  # face mode: the rows above are face crops; predict judges an image by their mean
        im = per_image_metrics(split.paths, split.y, split.probs, names)
        parts.append(f"<p class=per-image>Rows are face crops. Per image (the mean of its faces' probabilities, as "
                     f"predict decides): accuracy <b>{im['accuracy']:.3f}</b> · macro-F1 <b>{im['macro_f1']:.3f}</b>"
                     f" · {plural(im['n'], 'image')}</p>")
    parts.append("<table><tr><th>class</th><th>precision</th><th>recall</th><th>F1</th><th>support</th></tr>")
    for c, v in m["per_class"].items():
        parts.append(f"<tr><td>{e(c)}</td><td>{v['precision']:.2f}</td><td>{v['recall']:.2f}</td>"
                     f"<td>{v['f1']:.2f}</td><td>{v['support']}</td></tr>")
    parts.append("</table>")
    return "\n".join(parts) + "\n"


def _errors_html(split: Split, names: list[str], cm: np.ndarray, pred: np.ndarray, slug: str, gallery: int) -> str:
    """The most-confused class pairs and a gallery of the misclassified images, worst (highest loss) first."""
    e = html.escape
    off = sorted(((int(cm[i, j]), names[i], names[j]) for i in range(len(names)) for j in range(len(names))
                  if i != j and cm[i, j]), reverse=True)
    parts = ["<h3>Most-confused pairs</h3>" + ("<ol>" + "".join(
        f"<li>{e(a)} → {e(b)}: {plural(n, 'image')}</li>" for n, a, b in off[:8]) + "</ol>" if off
        else "<p>None: every image was given its own class.</p>")]
    p_true = split.probs[np.arange(len(split.y)), split.y]  # (N,)
    loss = -np.log(np.clip(p_true, 1e-12, 1))
    wrong = np.flatnonzero(pred != split.y)
    parts.append(f"<h3>Misclassified, worst first ({len(wrong)} in all)</h3><div class=gallery id=gallery-{slug}>")
    for i in wrong[np.argsort(-loss[wrong])][:gallery]:
        parts.append(card(split, names, i, pred[i], p_true[i]))
    parts.append("</div>")
    return "\n".join(parts)


def check_report_out(out: str) -> Path:
    return check_output(out, folder=True, is_ours=holds_only(
        "index.html", "summary.json", "confusion*.png", "confusion_*.csv", "reliability_*.png", "label_issues.csv",
        "learning_curve.*", "embedding_2d.csv", "embedding.png"), what="report folder")


def build_report(*, model_dir: str, out: str, test_stores: list[str] | None = None, gallery: int = 60,
                 progress=print) -> dict:
    if gallery < 0:
        raise UserError(f"--gallery {gallery}: must be >= 0 (images shown per gallery)")
    out_dir = check_report_out(out)
    md = Path(model_dir)
    head, info = load_model_dir(md)
    names = info.class_names
    oof = _oof_split(md, info)
    test = None
    if test_stores:
        h = heldout_logits(head=head, info=info, stores=test_stores, model_dir=md)
        said = "; ".join(filter(None, [sources_note(h.per_source), h.trained_note()]))
        test = Split(f"held-out test store ({said})", h.paths, h.labels, softmax(h.logits, info.temperature), h.root,
                     boxes=np.array([h.faces[k] for k in "xywh"]).T.reshape(-1, 4) if h.faces else None,
                     face=np.array(h.faces["face"]) if h.faces else None)
    with atomic_dir(out_dir) as d:
        progress(f"{out}: cross-validation section (confidence intervals, plots, gallery)")
        body, summary = _section(oof, names, d, "cv", gallery)
        progress(f"{out}: label issues, near-duplicates, learning curve, feature map")
        extra, found = insight_sections(info, oof, names, d, gallery)
        sections, result = [body, *extra], {"cv": summary, **found}
        if test is not None:
            progress(f"{out}: held-out test section")
            body, result["test"] = _section(test, names, d, "test", gallery)
            sections.append(body)
        (d / "confusion.png").write_bytes((d / "confusion_cv.png").read_bytes())
        page = (f"<!doctype html><html><head><meta charset='utf-8'><title>imgsent report</title><style>{CSS}</style>"
                f"</head><body><h1>imgsent report: {html.escape(md.resolve().name)}</h1><p>classes: "
                f"{html.escape(', '.join(names))} · backbones: "
                f"{html.escape(', '.join(b['backbone'] for b in info.backbones))} · head {json.dumps(list(info.hidden))} · "
                f"adaptation {info.adapt} (cross-validation adapts each held-out group by its own images)</p>" + "\n".join(sections)
                + "</body></html>")
        (d / "index.html").write_text(page, encoding="utf-8")
        (d / "summary.json").write_text(json.dumps(result, indent=2))
    return result


def summary_line(out: str, result: dict) -> str:
    """report's one line: the pooled out-of-fold score (train-head's is the mean of the folds) with its interval."""
    return (f"{Path(out) / 'index.html'}: pooled out-of-fold macro-F1 {result['cv']['macro_f1']:.3f} (95% CI "
            f"{result['cv']['macro_f1_ci95'][0]:.3f}-{result['cv']['macro_f1_ci95'][1]:.3f})"
            + (f", held-out test macro-F1 {result['test']['macro_f1']:.3f}" if "test" in result else ""))
