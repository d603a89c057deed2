"""Scoring and explaining: metrics, plots, label issues and the learning curve."""
