"""Metrics: classification accuracy and calibration from prediction rows."""

from tta.metrics.classification import classification_metrics, summarize

__all__ = ["classification_metrics", "summarize"]
