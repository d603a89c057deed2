"""The report's figures (matplotlib, Agg backend, PNG files): confusion matrix and reliability diagram."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.metrics import expected_calibration_error


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
