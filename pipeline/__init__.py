"""Stage two of imgsent: cached features -> head, cross-validation, evaluation, prediction.

    from pipeline import load_model
    p = load_model("out/model").predict(["a.jpg", "more/"])   # p.labels, p.probs (N, C), p.class_names
"""
import os

# Before torch loads its OpenMP runtime: its threads sleep instead of spinning while they wait. Beside two busy
# processes a hidden-layer head's fit took 37x its time alone with spinning threads, 2.2x with sleeping ones (5%
# slower alone); one thread would change the results (benchmarks/contention.py). Set it yourself to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__all__ = ["Predictor", "Predictions", "load_model"]


def __getattr__(name: str):
    # Lazy: `imgsent train-head` imports pipeline.* but must not pay for importing timm/torchvision.
    if name in __all__:
        from pipeline.inference import predict
        return getattr(predict, name)
    raise AttributeError(name)
