"""A fitted head as numpy arrays: standardisation, Linear layers with ReLU between them, temperature.

Every consumer (predict, evaluate, report, the model directory) needs only this file and numpy, never torch.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.inference.calibration import softmax


@dataclass
class Head:
    """What `LinearHead.fit` / `MLPHead.fit` produce and `load_model_dir` validates and loads."""
    layers: list[tuple[np.ndarray, np.ndarray]]  # (W (out, in), b (out,)) float32 per Linear layer
    mean: np.ndarray  # (D,) subtracted from raw features
    scale: np.ndarray  # (D,) then divided by
    temperature: float = 1.0  # fitted on out-of-fold logits (pipeline/inference/calibration.py)

    @property
    def hidden(self) -> tuple[int, ...]:
        return tuple(w.shape[0] for w, _ in self.layers[:-1])

    @property
    def n_classes(self) -> int:
        return self.layers[-1][0].shape[0]

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Raw features (B, D) -> uncalibrated logits (B, C)."""
        z = (np.asarray(x, np.float32) - self.mean) / self.scale
        for i, (w, b) in enumerate(self.layers):
            z = z @ w.T + b
            if i < len(self.layers) - 1:
                np.maximum(z, 0, out=z)
        return z

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Raw features (B, D) -> calibrated probabilities (B, C)."""
        return softmax(self.logits(x), self.temperature).astype(np.float32)


def head_logits(head: Head, rows, mask: np.ndarray | None = None, batch: int = 65536) -> np.ndarray:
    """Uncalibrated logits (sum(mask), C) of the store rows (pipeline/data/rows.py) where `mask` is True (all rows
    when None), in row order, read block by block when the store is streamed."""
    out = []
    for s, x in rows.blocks(mask):
        xs = x if mask is None else x[mask[s:s + len(x)]]
        for i in range(0, len(xs), batch):
            out.append(head.logits(xs[i:i + batch]))
    return np.concatenate(out) if out else np.zeros((0, head.n_classes), np.float32)
