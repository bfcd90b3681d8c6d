"""Metrics: classification accuracy and calibration from prediction rows; group scores."""

from tta.metrics.classification import classification_metrics, summarize
from tta.metrics.groups import (
    GroupMatch,
    GroupScore,
    ImageScore,
    MultipleChoiceAccuracy,
    TextScore,
    best_matching,
    group_match,
    group_match_margin,
    group_score,
    image_score,
    multiple_choice_accuracy,
    text_score,
)

__all__ = [
    "GroupMatch",
    "GroupScore",
    "ImageScore",
    "MultipleChoiceAccuracy",
    "TextScore",
    "best_matching",
    "classification_metrics",
    "group_match",
    "group_match_margin",
    "group_score",
    "image_score",
    "multiple_choice_accuracy",
    "summarize",
    "text_score",
]
