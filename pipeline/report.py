"""Error-analysis report: one self-contained HTML page (thumbnails inlined, no server, no network) plus
confusion.png, reliability.png and the CSVs DVC plots read. The same page from any working directory:
store paths and the image root come from model.json, absolute; a section that cannot be built says why.

Sections: headline metrics with bootstrap 95% CIs, per-class table, confusion matrix (counts and
row-normalised), most-confused pairs, misclassified gallery sorted by loss, likeliest label errors,
near-duplicates that fell into different CV folds. Built from the out-of-fold predictions of the training
store and, when a test store is given, from the model's predictions on it.
"""
from __future__ import annotations

import base64
import csv
import html
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from features.atomic import atomic_dir, check_output, holds_only
from features.errors import UserError
from features.images import decode
from pipeline.evaluate import predict_stores
from pipeline.head import softmax
from pipeline.metrics import classification_metrics, expected_calibration_error, write_confusion
from pipeline.modeldir import ModelInfo, load_model_dir
from pipeline.plots import plot_confusion, plot_reliability
from pipeline.rows import open_rows


@dataclass
class Split:
    name: str
    paths: list[str]
    y: np.ndarray  # (N,)
    probs: np.ndarray  # (N, C) calibrated
    root: str
    fold: np.ndarray | None = None


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
        logits = np.load(z, allow_pickle=False)
        y = np.array([names.index(r["label"]) for r in rows], dtype=np.int64)
        fold = np.array([int(r["fold"]) for r in rows])
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{f}: damaged (unreadable rows, unknown labels or no fold column); re-run imgsent train-head") from None
    if logits.shape != (len(rows), len(names)) or not np.isfinite(logits).all():
        raise UserError(f"{z}: shape {logits.shape} does not match {len(rows)} rows x {len(names)} classes; "
                        "re-run imgsent train-head")
    return Split("cross-validation (out-of-fold)", [r["path"] for r in rows], y, softmax(logits, info.temperature),
                 info.image_root, fold)


def bootstrap_ci(y: np.ndarray, pred: np.ndarray, n_classes: int, *, n_boot: int = 1000,
                 random_state: int = 0) -> dict[str, tuple[float, float]]:
    rng = np.random.default_rng(random_state)
    acc, f1 = [], []
    for _ in range(n_boot):
        i = rng.integers(0, len(y), len(y))
        acc.append((y[i] == pred[i]).mean())
        f1.append(classification_metrics(y[i], pred[i], [str(c) for c in range(n_classes)])["macro_f1"])
    q = lambda v: (float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5)))  # noqa: E731
    return {"accuracy": q(acc), "macro_f1": q(f1)}


def _thumb(root: str, path: str, size: int = 96) -> str:
    """Inline JPEG data URI, or '' when the image cannot be read any more."""
    from PIL import Image
    full = Path(path) if Path(path).is_absolute() else Path(root) / path
    try:
        im = Image.fromarray(decode(str(full)))
    except (ValueError, OSError):
        return ""
    im.thumbnail((size, size))
    b = io.BytesIO()
    im.save(b, "JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(b.getvalue()).decode()


def near_duplicates(features: np.ndarray, fold: np.ndarray, paths: list[str], *, threshold: float = 0.97,
                    max_queries: int = 20000, random_state: int = 0, top: int = 30) -> list[tuple[str, str, float]]:
    """Pairs in different folds whose stored features have cosine >= threshold: they inflate CV scores."""
    x = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)  # (N, D)
    q = np.arange(len(x))
    if len(q) > max_queries:  # N^2 D gets slow; sample the queries, never the candidates
        q = np.sort(np.random.default_rng(random_state).choice(len(x), max_queries, replace=False))
    found: dict[tuple[int, int], float] = {}
    for i0 in range(0, len(q), 1024):
        qi = q[i0:i0 + 1024]
        sim = x[qi] @ x.T  # (b, N)
        sim[fold[qi][:, None] == fold[None, :]] = -1  # only pairs across folds
        for a, b in zip(*np.nonzero(sim >= threshold)):
            i, j = sorted((int(qi[a]), int(b)))
            found[(i, j)] = float(sim[a, b])
    pairs = sorted(found.items(), key=lambda kv: -kv[1])[:top]
    return [(paths[i], paths[j], s) for (i, j), s in pairs]


def _section(split: Split, names: list[str], out: Path, slug: str, gallery: int) -> tuple[str, dict]:
    e = html.escape
    pred = split.probs.argmax(1)
    m = classification_metrics(split.y, pred, names)
    ci = bootstrap_ci(split.y, pred, len(names))
    cm = np.zeros((len(names), len(names)), dtype=np.int64)
    np.add.at(cm, (split.y, pred), 1)
    plot_confusion(cm, names, out / f"confusion_{slug}.png")
    plot_reliability(split.probs, split.y, out / f"reliability_{slug}.png")
    write_confusion(out / f"confusion_{slug}.csv", split.y, pred, names)
    p_true = split.probs[np.arange(len(split.y)), split.y]
    loss = -np.log(np.clip(p_true, 1e-12, 1))
    parts = [f"<h2>{e(split.name)}</h2>",
             f"<p class=headline>accuracy <b>{m['accuracy']:.3f}</b> (95% CI {ci['accuracy'][0]:.3f}–{ci['accuracy'][1]:.3f})"
             f" · macro-F1 <b>{m['macro_f1']:.3f}</b> (95% CI {ci['macro_f1'][0]:.3f}–{ci['macro_f1'][1]:.3f})"
             f" · balanced accuracy {m['balanced_accuracy']:.3f} · {m['n']} images · ECE "
             f"{expected_calibration_error(split.probs, split.y):.3f}</p>",
             "<table><tr><th>class</th><th>precision</th><th>recall</th><th>F1</th><th>support</th></tr>"]
    for c, v in m["per_class"].items():
        parts.append(f"<tr><td>{e(c)}</td><td>{v['precision']:.2f}</td><td>{v['recall']:.2f}</td>"
                     f"<td>{v['f1']:.2f}</td><td>{v['support']}</td></tr>")
    parts.append("</table>")
    parts.append(f"<img class=plot id=confusion-{slug} alt='confusion matrix' src='confusion_{slug}.png'>"
                 f"<img class=plot alt='reliability diagram' src='reliability_{slug}.png'>")
    off = [(int(cm[i, j]), names[i], names[j]) for i in range(len(names)) for j in range(len(names)) if i != j and cm[i, j]]
    off.sort(reverse=True)
    parts.append("<h3>Most-confused pairs</h3><ol>" + "".join(
        f"<li>{e(a)} → {e(b)}: {n} images</li>" for n, a, b in off[:8]) + "</ol>")
    wrong = np.flatnonzero(pred != split.y)
    wrong = wrong[np.argsort(-loss[wrong])][:gallery]
    parts.append(f"<h3>Misclassified, worst first ({len(np.flatnonzero(pred != split.y))} in all)</h3>"
                 f"<div class=gallery id=gallery-{slug}>")
    for i in wrong:
        parts.append(_card(split, names, i, pred[i], p_true[i]))
    parts.append("</div>")
    suspects = np.flatnonzero((split.probs.max(1) >= 0.5) & (pred != split.y))
    suspects = suspects[np.argsort(p_true[suspects])][:24]
    parts.append("<h3>Likeliest label errors</h3><p>Lowest p(true) while the model is confident in another "
                 "class: check these labels first.</p><div class=gallery>")
    parts += [_card(split, names, i, pred[i], p_true[i]) for i in suspects]
    parts.append("</div>")
    summary = {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "accuracy_ci95": ci["accuracy"],
               "macro_f1_ci95": ci["macro_f1"], "n": m["n"], "misclassified": int((pred != split.y).sum())}
    return "\n".join(parts), summary


def _card(split: Split, names: list[str], i: int, pred: int, p_true: float) -> str:
    e = html.escape
    src = _thumb(split.root, split.paths[i])
    img = f"<img src='{src}' alt='{e(split.paths[i], quote=True)}'>" if src else "<div class=missing>image unavailable</div>"
    return (f"<figure>{img}<figcaption><code>{e(split.paths[i])}</code><br>true <b>{e(names[split.y[i]])}</b> "
            f"p={p_true:.2f}<br>pred <b>{e(names[pred])}</b> p={split.probs[i, pred]:.2f}</figcaption></figure>")


CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
td:first-child{text-align:left}.headline{font-size:1.1em}.plot{max-width:100%;margin:0.5em 1em 0.5em 0}
.gallery{display:flex;flex-wrap:wrap;gap:10px}figure{margin:0;width:150px;font-size:12px;border:1px solid #ddd;
padding:4px}figure img{width:96px;height:96px;object-fit:contain;display:block;margin:auto}
code{word-break:break-all}.missing{height:96px;background:#eee}.note{color:#8a5a00}"""


def _near_duplicate_section(info: ModelInfo, oof: Split) -> tuple[str, int | None]:
    """Near-duplicates across folds on the model's own (fused) features, or a note saying why not."""
    e = html.escape
    title = "<h3>Near-duplicates in different folds</h3>"
    try:
        rows = open_rows(info.stores, expect=info.backbones, intersect=True)
    except UserError as err:
        return f"{title}<p class=note>Skipped: the training store cannot be read ({e(str(err))}).</p>", None
    if not rows.in_memory:
        return (f"{title}<p class=note>Skipped: the training features exceed the memory budget; this check needs "
                "them in memory.</p>"), None
    idx = {p: i for i, p in enumerate(rows.paths)}
    at = [idx.get(p) for p in oof.paths]
    if any(i is None for i in at):
        return (f"{title}<p class=note>Skipped: the training store no longer holds every image the model was "
                "trained on (re-extracted since?); re-run train-head.</p>"), None
    dups = near_duplicates(rows.features[at], oof.fold, oof.paths)
    if not dups:
        return f"{title}<p>None found (cosine &ge; 0.97).</p>", 0
    return (f"{title}<p>Pairs of images whose features have cosine similarity &ge; 0.97 but that sat on both sides "
            "of a CV split: they inflate CV scores. Put them in one <code>group</code> in the manifest.</p>"
            "<ol id=near-duplicates>" + "".join(f"<li><code>{e(a)}</code> ~ <code>{e(b)}</code> ({s:.3f})</li>"
                                              for a, b, s in dups) + "</ol>"), len(dups)


def check_report_out(out: str) -> Path:
    return check_output(out, folder=True, is_ours=holds_only("index.html", "summary.json", "confusion*.png",
                                                                          "confusion_*.csv", "reliability_*.png"), what="report folder")


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
        paths, y, logits, troot = predict_stores(head=head, info=info, stores=test_stores)
        test = Split("held-out test store", paths, y, softmax(logits, info.temperature), troot)
    dup_html, n_dups = _near_duplicate_section(info, oof)
    with atomic_dir(out_dir) as d:
        body, summary = _section(oof, names, d, "cv", gallery)
        sections, result = [body, dup_html], {"cv": summary}
        if n_dups is not None:
            result["near_duplicates_across_folds"] = n_dups
        if test is not None:
            body, result["test"] = _section(test, names, d, "test", gallery)
            sections.append(body)
        (d / "confusion.png").write_bytes((d / "confusion_cv.png").read_bytes())
        page = (f"<!doctype html><html><head><meta charset='utf-8'><title>imgsent report</title><style>{CSS}</style>"
                f"</head><body><h1>imgsent report: {html.escape(md.resolve().name)}</h1><p>classes: "
                f"{html.escape(', '.join(names))} · backbones: "
                f"{html.escape(', '.join(b['backbone'] for b in info.backbones))}</p>" + "\n".join(sections)
                + "</body></html>")
        (d / "index.html").write_text(page, encoding="utf-8")
        (d / "summary.json").write_text(json.dumps(result, indent=2))
    progress(f"{Path(out) / 'index.html'}: CV macro-F1 {result['cv']['macro_f1']:.3f} "
             f"[{result['cv']['macro_f1_ci95'][0]:.3f}, {result['cv']['macro_f1_ci95'][1]:.3f}]"
             + (f", test macro-F1 {result['test']['macro_f1']:.3f}" if "test" in result else ""))
    return result
