"""The report's figures (matplotlib, Agg backend, PNG files): confusion matrix, reliability diagram, learning
curve, embedding map."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.analysis.metrics import expected_calibration_error


def plot_confusion(cm: np.ndarray, names: list[str], out: Path) -> None:
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


def plot_reliability(probs: np.ndarray, y: np.ndarray, out: Path, bins: int = 10) -> None:
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


def tick_rotation(x: list[float], gap: float = 0.15) -> int:
    """Degrees to turn the learning curve's tick labels: 90 when two points lie closer than `gap` on the log axis
    (20 beside 24 overlapped; blanking one instead left the tick at 10 without a label), else 0."""
    return 90 if any(np.log10(b) - np.log10(a) < gap for a, b in zip(x, x[1:])) else 0


def plot_learning_curve(points: list[dict], out: Path) -> None:
    """macro-F1 (with its 95% interval) against training images per class, log x."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n = [p["per_class"] for p in points]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.fill_between(n, [p["lo"] for p in points], [p["hi"] for p in points], alpha=0.25)
    ax.plot(n, [p["macro_f1"] for p in points], "o-")
    ax.set_xscale("log")
    ax.set_xticks(n, [str(v) for v in n], rotation=tick_rotation(n), fontsize=8)  # every measured point labelled,
    # not log-scale minor labels
    from matplotlib.ticker import NullLocator
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("training images per class (at most)")
    ax.set_ylabel("CV macro-F1")
    ax.set_title("learning curve")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_embedding(xy: np.ndarray, y: np.ndarray, names: list[str], wrong: np.ndarray, issues: np.ndarray,
                   pairs: list[tuple[int, int]], out: Path) -> None:
    """2-D map of the training features: colour = label, x = misclassified out of fold, ring = suspected label
    error, grey ring (and line) = near-duplicate pair split across folds, in the legend only when there is one."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 6))
    for i, j in pairs:  # a near-duplicate pair lies on one spot of the map: a line alone is invisible, so a ring too
        ax.plot(xy[[i, j], 0], xy[[i, j], 1], "-", color="grey", lw=0.8, zorder=1)
    if pairs:
        both = np.unique(np.array(pairs).ravel())
        ax.scatter(xy[both, 0], xy[both, 1], s=160, facecolors="none", edgecolors="grey", lw=1.5, zorder=1,
                   label=f"near-duplicates across folds ({len(pairs)} pair{'s' if len(pairs) != 1 else ''})")
    cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    for c, name in enumerate(names):
        m = (y == c) & ~wrong
        ax.scatter(xy[m, 0], xy[m, 1], s=10, color=cmap(c % cmap.N), label=name, zorder=2)
        m = (y == c) & wrong
        ax.scatter(xy[m, 0], xy[m, 1], s=22, color=cmap(c % cmap.N), marker="x", zorder=3)
    ax.scatter(xy[issues, 0], xy[issues, 1], s=90, facecolors="none", edgecolors="black", lw=1.2, zorder=4,
               label="suspected label error")
    ax.set_title("training features, 2-D (x = misclassified out of fold)")
    ax.legend(fontsize=7, markerscale=1.5, loc="best")
    ax.set_xticks([]), ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
