"""Stage two of imgsent: cached features -> head, cross-validation, evaluation, prediction.

    from pipeline import load_model
    p = load_model("out/model").predict(["a.jpg", "more/"])   # p.labels, p.probs (N, C), p.class_names
"""
import features  # noqa: F401  first: it sets the environment torch must start with (features/__init__.py)

__all__ = ["Predictor", "Predictions", "load_model"]


def __getattr__(name: str):
    # Lazy: `imgsent train-head` imports pipeline.* but must not pay for importing timm/torchvision.
    if name in __all__:
        from pipeline.inference import predict
        return getattr(predict, name)
    raise AttributeError(name)
