"""Heads: `Head`, a fitted head as numpy arrays (inference and the model directory), and the estimators that fit
one on cached features, `LinearHead` (heads/linear.py) and `MLPHead` (heads/mlp.py, imports torch)."""
from pipeline.heads.head import Head

__all__ = ["Head"]
