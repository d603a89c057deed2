"""Metrics shared by cross-validation, evaluate and report, and the CSV files DVC plots read."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from pipeline.data.rows import image_means


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, class_names: list[str]) -> dict:
    """Accuracy, macro-F1 over every class (a class never seen nor predicted scores 0, as scikit-learn's
    zero_division=0), balanced accuracy over the classes present, per-class precision/recall/F1/support.
    numpy only: scikit-learn's import costs a second of every train-head."""
    c, n = len(class_names), len(y_true)
    cm = np.bincount(np.asarray(y_true) * c + np.asarray(y_pred), minlength=c * c).reshape(c, c)  # (C, C)
    tp, support, predicted = np.diag(cm).astype(float), cm.sum(1), cm.sum(0)
    p = np.divide(tp, predicted, out=np.zeros(c), where=predicted > 0)
    r = np.divide(tp, support, out=np.zeros(c), where=support > 0)
    f = np.divide(2 * p * r, p + r, out=np.zeros(c), where=(p + r) > 0)
    return {
        "n": int(n),
        "accuracy": float(tp.sum() / n) if n else 0.0,
        "macro_f1": float(f.mean()),
        "balanced_accuracy": float(r[support > 0].mean()) if n else 0.0,
        "per_class": {name: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                             "support": int(support[i])} for i, name in enumerate(class_names)},
    }


def per_image_metrics(paths: list[str], y: np.ndarray, probs: np.ndarray, class_names: list[str]) -> dict:
    """Face mode (`all`): rows are face crops; an image's verdict is the mean of its faces' calibrated
    probabilities, as predict gives it. n, accuracy, macro-F1 and balanced accuracy over images."""
    first, (mean,) = image_means(paths, probs)  # (I,), (I, C)
    m = classification_metrics(y[first], mean.argmax(1), class_names)  # an image's faces share its label
    return {k: m[k] for k in ("n", "accuracy", "macro_f1", "balanced_accuracy")}


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """ECE with equal-width confidence bins: sum_b |acc_b - conf_b| * n_b / N."""
    if not len(labels):
        return 0.0
    conf = probs.max(1)
    correct = probs.argmax(1) == labels
    edges = np.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            ece += abs(correct[m].mean() - conf[m].mean()) * m.mean()
    return float(ece)


def write_predictions(path: Path, *, paths: list[str], labels: list[str] | None, probs: np.ndarray,
                      class_names: list[str], extra: dict[str, list | np.ndarray] | None = None) -> None:
    """path,label,predicted,confidence,<extra>...,p_<class>... (label column only when known), as csv.writer writes
    it. The numbers are formatted by fixed_6 a block of BLOCK rows at a time (a csv.writer row at a time cost 33 us
    a row; '%.6f' a number at a time 0.2 s for 10,000 x 100)."""
    pred = probs.argmax(1) if len(probs) else np.zeros(0, int)
    names = [_field(c) for c in class_names]
    head = ["path"] + (["label"] if labels is not None else []) + ["predicted", "confidence"]
    head += list(extra or {}) + [f"p_{c}" for c in class_names]
    cols = [_fields(v) for v in ([labels] if labels is not None else [])]  # the label column, then...
    more = [_fields(v) for v in (extra or {}).values()]  # ...the extra columns, as fields
    with open(path, "w", newline="") as f:
        f.write(",".join(_field(h) for h in head) + "\r\n")
        for s in range(0, len(paths), BLOCK):
            e = min(len(paths), s + BLOCK)
            conf, nums = fixed_6(probs[s:e].max(1)[:, None]), fixed_6(probs[s:e])  # (e - s) rows each
            f.writelines(",".join([_field(paths[i])] + [v[i] for v in cols] + [names[pred[i]], conf[i - s]]
                                  + [v[i] for v in more] + [nums[i - s]]) + "\r\n" for i in range(s, e))


BLOCK = 4096


def fixed_6(p: np.ndarray) -> list[str]:
    """Each row of p (n, C) as ','.join(f'{v:.6f}' for v in row), the same characters. Values in [0, 1] (every
    probability) are rounded and spelt out by numpy, 10x faster than '%' per value. A row holding another value, or
    (float64) one within 1e-7 of a rounding tie, where v * 1e6 might round otherwise than '%.6f' on the exact value,
    goes through '%' (float32 values cannot: v * 1e6 is exact in float64, and both round ties to even)."""
    n, c = p.shape
    v = np.asarray(p, np.float64) * 1e6  # (n, C)
    odd = ~(np.isfinite(v) & (v >= 0) & (v <= 1e6)).all(1)  # (n,) rows for '%'
    v = np.where(odd[:, None], 0, v)
    if p.dtype != np.float32:
        odd |= (np.abs(v - np.floor(v) - 0.5) < 1e-7).any(1)
    q = np.rint(v).astype(np.int64)
    frac = q % 1_000_000
    words = (q // 1_000_000 + _POINT) | _HIGH3[frac // 1000] | _LOW3[frac % 1000]  # (n, C) uint64 'd.dddddd'
    chars = np.empty((n, c, 9), np.uint8)
    chars[..., :8] = words.astype("<u8").view(np.uint8).reshape(n, c, 8)
    chars[..., 8] = ord(",")
    if c:
        chars[:, -1, 8] = ord("\n")
    rows = chars.tobytes().decode("ascii").split("\n")[:n] if c else [""] * n
    if odd.any():
        fmt = ",".join(["%.6f"] * c)
        for i in np.flatnonzero(odd):
            rows[i] = fmt % tuple(p[i].tolist())
    return rows


# 'd.dddddd' as a little-endian uint64: byte 0 the units digit ('0' + q // 10^6 added to _POINT), byte 1 '.',
# bytes 2-4 and 5-7 the fraction's two halves, each looked up among 1,000
_POINT = np.int64(48 + (ord(".") << 8))
_HIGH3 = np.array([sum((48 + int(ch)) << (8 * (2 + j)) for j, ch in enumerate(f"{i:03d}")) for i in range(1000)],
                  np.int64)
_LOW3 = _HIGH3 << 24


def _fields(values) -> list[str]:
    """Each value's str as a CSV field (_field), each distinct one formatted once: a label, fold or source column
    holds a few values over many rows (35,887 rows: 0.19 s of _field calls, 0.05 s now). A numpy array of ints or
    strings (train-head's fold and source columns) is not made into a Python object per row on the way: for
    160,000 rows those were ~20 MB at the peak of a streamed train-head (docs/scaling.md's bound)."""
    if isinstance(values, np.ndarray) and values.dtype.kind in "iuU":
        distinct, which = np.unique(values, return_inverse=True)
        done = [_field(str(v)) for v in distinct]
        return [done[i] for i in which.ravel()]
    text = [str(v) for v in values]
    done = {t: _field(t) for t in set(text)}
    return [done[t] for t in text]


def _field(s: str) -> str:
    """A CSV field as csv.writer's QUOTE_MINIMAL writes it: quoted when it holds a comma, quote or line break."""
    return '"' + s.replace('"', '""') + '"' if any(c in s for c in ',"\r\n') else s


def write_metrics(d: Path, record: dict, headline: dict[str, tuple[str, ...]]) -> None:
    """metrics.json: the `headline` numbers of `record` (section -> keys), rounded to the 4 decimals they are read
    at: what DVC shows as metrics, one column each (`dvc metrics show` stays narrow). details.json: the whole
    record, with every why and per-class, per-fold and per-source figure (DVC does not read it as metrics)."""
    top = {sec: {k: round(record[sec][k], 4) if isinstance(record[sec][k], float) else record[sec][k]
                 for k in keys if k in record[sec]} for sec, keys in headline.items()}
    (d / "metrics.json").write_text(json.dumps(top, indent=2))
    (d / "details.json").write_text(json.dumps(record, indent=2))


def write_confusion(path: Path, y_true: np.ndarray, y_pred: np.ndarray, class_names: list[str]) -> None:
    """One row per image (actual, predicted): the input DVC's confusion template expects."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["actual", "predicted"])
        for t, p in zip(y_true, y_pred):
            w.writerow([class_names[t], class_names[p]])
