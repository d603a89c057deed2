"""A fitted head as numpy arrays: standardisation, Linear layers with ReLU between them, temperature, and the
training statistics a new source is adapted to (heads/adapt.py).

Every consumer (predict, evaluate, report, the model directory) needs only this file and numpy, never torch.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import numpy as np

SMALL_BATCH = 1024  # rows: a shorter batch's products run on one BLAS thread (Head.logits)


@functools.cache
def _blas():
    """threadpoolctl's handle on the BLAS numpy calls, found once (a limit() then costs ~16 us)."""
    from threadpoolctl import ThreadpoolController
    return ThreadpoolController().select(user_api="blas")


def one_blas_thread():
    """A context in which numpy's products run on one BLAS thread (process-wide: threads calling numpy inside it
    each compute on their own)."""
    return _blas().limit(limits=1)


def blas_threads_for(rows: int):
    """A context in which numpy's products on `rows` rows run: one BLAS thread below SMALL_BATCH, else as set.
    OpenBLAS's threads spin while they wait: on small products two threads were 1.5x faster alone, and beside
    two busy processes 2x-45x slower than one (60 x 1280 @ 1280 x 256: 15-33 ms against 0.7 ms;
    benchmarks/contention.py)."""
    return one_blas_thread() if rows < SMALL_BATCH else contextlib.nullcontext()


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Probabilities (N, C) of logits (N, C) at a temperature (pipeline/inference/calibration.py fits it)."""
    z = logits / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


@dataclass(frozen=True)
class Reference:
    """Per class: the mean and the mean square of the training rows' raw features; and the class mix."""
    mean: np.ndarray  # (C, D) float32
    sq: np.ndarray  # (C, D) float32
    prior: np.ndarray  # (C,) float32, sums to 1

    def moments(self, pi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(centre (D,), variance (D,)) of training rows drawn with class mix pi (C,), float64; or of many mixes
        pi (S, C) at once, (S, D) each. A dimension with (nearly) no training variance is floored at a tenth of the
        typical one, as heads/common.robust_scale."""
        centre = pi @ self.mean.astype(np.float64)
        var = np.maximum(pi @ self.sq.astype(np.float64) - centre ** 2, 0.0)
        return centre, np.maximum(var, (0.1 * np.sqrt(var).mean(-1, keepdims=True)) ** 2 + 1e-24)


@dataclass(frozen=True)
class Head:
    """What `LinearHead.fit` / `MLPHead.fit` produce and `load_model_dir` validates and loads."""
    layers: list[tuple[np.ndarray, np.ndarray]]  # (W (out, in), b (out,)) float32 per Linear layer
    mean: np.ndarray  # (D,) subtracted from raw features
    scale: np.ndarray  # (D,) then divided by
    temperature: float = 1.0  # fitted on out-of-fold logits (pipeline/inference/calibration.py)
    reference: Reference | None = None  # the training rows' class statistics (heads/adapt.py)
    capped: bool = False  # its fit ran to head.epochs before its stop rule decided (not saved: a fact of the fit)

    @property
    def hidden(self) -> tuple[int, ...]:
        return tuple(w.shape[0] for w, _ in self.layers[:-1])

    @property
    def n_classes(self) -> int:
        return self.layers[-1][0].shape[0]

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Raw features (B, D) -> uncalibrated logits (B, C). On a batch at least as long as the first layer is
        wide the standardisation is folded into that layer, ((x - mean) / scale) @ W.T + b = x @ (W / scale).T +
        (b - (W / scale) @ mean): a (width, D) pass instead of a (B, D) one (the linear head's logits on 4,096
        x 1280: 6x faster); a shorter batch (5 images adapted in CV's stress batches) standardises itself."""
        x = np.asarray(x, np.float32)
        w, b = self.layers[0]
        with blas_threads_for(len(x)):
            if len(x) >= len(w):
                w = w / self.scale  # (out, D)
                z = x @ w.T + (b - w @ self.mean)  # (B, out)
            else:
                z = (x - self.mean) / self.scale @ w.T + b
            for w, b in self.layers[1:]:
                np.maximum(z, 0, out=z)
                z = z @ w.T + b
        return z

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Raw features (B, D) -> calibrated probabilities (B, C)."""
        return softmax(self.logits(x), self.temperature).astype(np.float32)
