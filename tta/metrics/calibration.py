"""Calibration bins shared by the metric (``tta.metrics.classification``) and the reliability
diagrams of ``tta-report``; NumPy only, so that reading a finished run imports no torch."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

#: Equal-width confidence bins of the top-label ECE.
ECE_BINS = 15


class Reliability(NamedTuple):
    """Per bin: the bin centres, the rows' count, accuracy and mean confidence; and the ECE."""

    centres: np.ndarray
    count: np.ndarray
    accuracy: np.ndarray
    confidence: np.ndarray
    ece: float


def reliability(confidence: Sequence[float], correct: Sequence[bool], n_bins: int = ECE_BINS) -> Reliability:
    """Top-label reliability over ``n_bins`` equal-width bins, left-closed as torchmetrics'
    ``binary_calibration_error`` bins them (a confidence on an inner edge falls in the upper bin;
    a confidence of 1 in the last bin, where torchmetrics gives it a bin of its own)."""
    conf, hit = np.asarray(confidence, dtype=np.float64), np.asarray(correct, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.searchsorted(edges[1:-1], conf, side="right")
    count = np.bincount(bins, minlength=n_bins).astype(np.float64)
    accuracy = np.bincount(bins, hit, minlength=n_bins) / np.maximum(count, 1)
    mean_conf = np.bincount(bins, conf, minlength=n_bins) / np.maximum(count, 1)
    ece = float((count / max(count.sum(), 1) * np.abs(accuracy - mean_conf)).sum())
    return Reliability((edges[:-1] + edges[1:]) / 2, count, accuracy, mean_conf, ece)
