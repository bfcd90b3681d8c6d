"""Lightning callbacks: the prediction writer, and one thin adapter per TTA method."""

from tta.callbacks.writer import PredictionWriter

__all__ = ["PredictionWriter"]
