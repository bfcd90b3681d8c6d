"""Lightning callbacks: the prediction writer, and one thin adapter per TTA method."""

from tta.callbacks.base import EpisodicTTA, SetTTA, TTACallback
from tta.callbacks.boostadapter import BoostAdapter
from tta.callbacks.ctpt import CTPT
from tta.callbacks.difftpt import DiffTPT
from tta.callbacks.dmn import DMN
from tta.callbacks.dota import DOTA
from tta.callbacks.dpe import DPE
from tta.callbacks.lame import LAME
from tta.callbacks.mta import MTA
from tta.callbacks.online import OnlineTTA
from tta.callbacks.progress import TTAProgressBar
from tta.callbacks.search import SearchTTA
from tta.callbacks.sts import STS
from tta.callbacks.tda import TDA
from tta.callbacks.tpt import TPT
from tta.callbacks.ttm import TTM
from tta.callbacks.views import ViewAverage
from tta.callbacks.writer import PredictionWriter
from tta.callbacks.zero import ZERO

__all__ = [
    "CTPT",
    "DMN",
    "DOTA",
    "DPE",
    "LAME",
    "MTA",
    "STS",
    "TDA",
    "TPT",
    "TTM",
    "ZERO",
    "BoostAdapter",
    "DiffTPT",
    "EpisodicTTA",
    "OnlineTTA",
    "PredictionWriter",
    "SearchTTA",
    "SetTTA",
    "TTACallback",
    "TTAProgressBar",
    "ViewAverage",
]
