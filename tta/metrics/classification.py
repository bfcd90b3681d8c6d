"""Accuracy and expected calibration error, overall and per domain, from prediction rows."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics.functional.classification import binary_calibration_error

from tta.metrics.calibration import ECE_BINS


def classification_metrics(pred: torch.Tensor, label: torch.Tensor, confidence: torch.Tensor) -> dict:
    """``n``, ``accuracy`` (fraction) and top-label ``ece`` (15 equal-width bins) of labelled rows.

    Top-label ECE is the binary calibration error of (confidence of the predicted class,
    prediction correct), the usual definition for classifiers.
    """
    known = label >= 0
    pred, label, confidence = pred[known], label[known], confidence[known].double()
    n = int(known.sum())
    if n == 0:
        return {"n": 0, "accuracy": None, "ece": None}
    correct = (pred == label).long()
    ece = binary_calibration_error(confidence, correct, n_bins=ECE_BINS, norm="l1")
    return {"n": n, "accuracy": correct.double().mean().item(), "ece": ece.item()}


def summarize(pred: Sequence[int], label: Sequence[int], confidence: Sequence[float], domain: Sequence[str]) -> dict:
    """Overall metrics plus ``domains``: each domain's ``n``, ``accuracy``, ``ece``, in first-seen order."""
    pred_t, label_t = torch.tensor(list(pred)), torch.tensor(list(label))
    confidence_t = torch.tensor(list(confidence), dtype=torch.float64)
    out = classification_metrics(pred_t, label_t, confidence_t)
    out["domains"] = {}
    for name in dict.fromkeys(domain):
        mask = torch.tensor([d == name for d in domain])
        out["domains"][name] = classification_metrics(pred_t[mask], label_t[mask], confidence_t[mask])
    return out
