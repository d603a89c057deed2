"""Error-analysis report: one self-contained HTML page (thumbnails inlined, no server, no network) plus
confusion.png, reliability.png and the CSVs DVC plots read.

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

from features.errors import UserError
from features.images import decode
from features.store import read_store
from pipeline.metrics import classification_metrics, expected_calibration_error, write_confusion
from pipeline.model import load_head


@dataclass
class Split:
    name: str
    paths: list[str]
    y: np.ndarray  # (N,)
    probs: np.ndarray  # (N, C) calibrated
    root: str
    fold: np.ndarray | None = None


def _oof_split(model_dir: Path, names: list[str], root: str) -> Split:
    f = model_dir / "oof_predictions.csv"
    if not f.is_file():
        raise UserError(f"{model_dir}: no oof_predictions.csv; re-run imgsent train-head")
    rows = list(csv.DictReader(open(f, newline="")))
    probs = np.array([[float(r[f"p_{c}"]) for c in names] for r in rows], dtype=np.float64).reshape(-1, len(names))
    return Split("cross-validation (out-of-fold)", [r["path"] for r in rows],
                 np.array([names.index(r["label"]) for r in rows], dtype=np.int64), probs, root,
                 np.array([int(r["fold"]) for r in rows]))


def bootstrap_ci(y: np.ndarray, pred: np.ndarray, n_classes: int, *, n_boot: int = 1000,
                 random_state: int = 0) -> dict[str, tuple[float, float]]:
    from sklearn.metrics import f1_score
    rng = np.random.default_rng(random_state)
    acc, f1 = [], []
    for _ in range(n_boot):
        i = rng.integers(0, len(y), len(y))
        acc.append((y[i] == pred[i]).mean())
        f1.append(f1_score(y[i], pred[i], labels=range(n_classes), average="macro", zero_division=0))
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


def _plot_confusion(cm: np.ndarray, names: list[str], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    fig, axes = plt.subplots(1, 2, figsize=(4 + 1.1 * len(names), 1.5 + 0.55 * len(names)))
    for ax, m, title, fmt in ((axes[0], cm, "counts", "{:d}"), (axes[1], norm, "row-normalised (recall)", "{:.2f}")):
        ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
        ax.set_yticks(range(len(names)), names)
        ax.set_xlabel("predicted")
        ax.set_ylabel("actual")
        ax.set_title(title)
        for i in range(len(names)):
            for j in range(len(names)):
                ax.text(j, i, fmt.format(m[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if norm[i, j] > 0.5 else "black")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _plot_reliability(probs: np.ndarray, y: np.ndarray, out: Path, bins: int = 10) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    conf, ok = probs.max(1), probs.argmax(1) == y
    edges = np.linspace(0, 1, bins + 1)
    mids, accs = [], []
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            mids.append(conf[m].mean())
            accs.append(ok[m].mean())
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.plot([0, 1], [0, 1], "--", color="grey")
    ax.plot(mids, accs, "o-")
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(f"reliability (ECE {expected_calibration_error(probs, y):.3f})")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


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
    _plot_confusion(cm, names, out / f"confusion_{slug}.png")
    _plot_reliability(split.probs, split.y, out / f"reliability_{slug}.png")
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
code{word-break:break-all}.missing{height:96px;background:#eee}"""


def build_report(*, model_dir: str, out: str, test_stores: list[str] | None = None, gallery: int = 60,
                 progress=print) -> dict:
    md = Path(model_dir)
    head, meta = load_head(md)
    names = meta["class_names"]
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    train_store = meta["stores"][0]
    try:
        train = read_store(train_store)
        root = train.root
    except UserError:
        train, root = None, ""
    oof = _oof_split(md, names, root)
    body, summary = _section(oof, names, d, "cv", gallery)
    sections = [body]
    result = {"cv": summary}
    if train is not None:
        idx = {p: i for i, p in enumerate(train.paths)}
        rows = [idx.get(p) for p in oof.paths]
        if all(r is not None for r in rows):
            dups = near_duplicates(train.features[rows], oof.fold, oof.paths)
            result["near_duplicates_across_folds"] = len(dups)
            e = html.escape
            sections.append("<h3>Near-duplicates in different folds</h3><p>Pairs of images whose stored features "
                            "have cosine similarity &ge; 0.97 but that sat on both sides of a CV split: they "
                            "inflate CV scores. Put them in one <code>group</code> in the manifest.</p><ol>" +
                            "".join(f"<li><code>{e(a)}</code> ~ <code>{e(b)}</code> ({s:.3f})</li>" for a, b, s in dups)
                            + "</ol>" if dups else "<h3>Near-duplicates in different folds</h3><p>None found "
                            "(cosine &ge; 0.97).</p>")
    if test_stores:
        from pipeline.evaluate import predict_stores
        from pipeline.head import softmax
        paths, y, logits, troot = predict_stores(head=head, meta=meta, stores=test_stores)
        probs = softmax(logits, float(meta.get("temperature", 1.0)))
        body, summary = _section(Split("held-out test store", paths, y, probs, troot), names, d, "test", gallery)
        sections.append(body)
        result["test"] = summary
    import shutil
    shutil.copy(d / "confusion_cv.png", d / "confusion.png")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>imgsent report</title><style>{CSS}</style>"
            f"</head><body><h1>imgsent report: {html.escape(md.name)}</h1><p>classes: "
            f"{html.escape(', '.join(names))} · backbones: "
            f"{html.escape(', '.join(b['backbone'] for b in meta['backbones']))}</p>" + "\n".join(sections)
            + "</body></html>")
    (d / "index.html").write_text(page, encoding="utf-8")
    (d / "summary.json").write_text(json.dumps(result, indent=2))
    progress(f"{d / 'index.html'}: CV macro-F1 {result['cv']['macro_f1']:.3f} "
             f"[{result['cv']['macro_f1_ci95'][0]:.3f}, {result['cv']['macro_f1_ci95'][1]:.3f}]"
             + (f", test macro-F1 {result['test']['macro_f1']:.3f}" if "test" in result else ""))
    return result
