"""Metrics: classification accuracy and calibration from prediction rows; group scores.

The names below are imported on first use (PEP 562), so that ``tta.metrics.calibration``
(NumPy only, for ``tta-report``) can be imported without torch.
"""

from importlib import import_module
from typing import Any

#: name -> the submodule that defines it
_EXPORTS = {
    "classification_metrics": "classification",
    "summarize": "classification",
    "ECE_BINS": "calibration",
    "reliability": "calibration",
    **dict.fromkeys(
        (
            "GroupMatch",
            "GroupScore",
            "ImageScore",
            "MultipleChoiceAccuracy",
            "TextScore",
            "best_matching",
            "group_match",
            "group_match_margin",
            "group_score",
            "image_score",
            "multiple_choice_accuracy",
            "text_score",
        ),
        "groups",
    ),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
