"""Stage two of imgsent: cached features -> head, cross-validation, evaluation, prediction.

    from pipeline import load_model
    m = load_model("out/model")
    p = m.predict(["a.jpg", "more/"])   # p.labels, p.probs (N, C), p.class_names
"""
from pipeline.predict import Model, Predictions, load_model

__all__ = ["Model", "Predictions", "load_model"]
