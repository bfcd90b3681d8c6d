"""The LightningModules that define a prediction task over a model: zero-shot classification
(``ZeroShotClassifier``), plain timm classifiers (``TimmClassifier``), k x k image-caption
groups (``GroupScorer``) and visual-search episodes (``SearchEpisodeRunner``).

They sit above ``tta.models`` (the model itself) and ``tta.methods`` (the method math), and
each tells ``tta.callbacks.PredictionWriter`` how its predictions are written (the
``PredictionTask`` members).
"""

from tta.tasks.group_scorer import GroupScorer
from tta.tasks.search_runner import SearchEpisodeRunner
from tta.tasks.timm_classifier import TimmClassifier
from tta.tasks.zero_shot import ZeroShotClassifier

__all__ = ["GroupScorer", "SearchEpisodeRunner", "TimmClassifier", "ZeroShotClassifier"]
