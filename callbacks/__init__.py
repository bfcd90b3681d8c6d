"""Lightning callbacks: the prediction writer, and one thin adapter per TTA method."""

from tta.callbacks.base import EpisodicTTA, SetTTA, TTACallback
from tta.callbacks.ctpt import CTPT
from tta.callbacks.difftpt import DiffTPT
from tta.callbacks.lame import LAME
from tta.callbacks.mta import MTA
from tta.callbacks.progress import TTAProgressBar
from tta.callbacks.search import SearchTTA
from tta.callbacks.sts import STS
from tta.callbacks.tpt import TPT
from tta.callbacks.ttm import TTM
from tta.callbacks.views import ViewAverage
from tta.callbacks.writer import PredictionWriter
from tta.callbacks.zero import ZERO

__all__ = [
    "CTPT",
    "LAME",
    "MTA",
    "STS",
    "TPT",
    "TTM",
    "ZERO",
    "DiffTPT",
    "EpisodicTTA",
    "PredictionWriter",
    "SearchTTA",
    "SetTTA",
    "TTACallback",
    "TTAProgressBar",
    "ViewAverage",
]
