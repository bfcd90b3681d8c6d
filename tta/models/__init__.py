"""Vision-language model wrapper, prompt learner, model factory, and the LightningModules: zero-shot, timm, group scoring, search episodes."""

from tta.models.factory import SHIPPED_MODELS, create_vlm
from tta.models.group_scorer import GroupScorer
from tta.models.prompt import PromptLearner
from tta.models.search_runner import SearchEpisodeRunner
from tta.models.text_tower import TextTower
from tta.models.timm_classifier import TimmClassifier
from tta.models.vlm import VisionLanguageModel
from tta.models.zero_shot import ZeroShotClassifier

__all__ = ["SHIPPED_MODELS", "GroupScorer", "PromptLearner", "SearchEpisodeRunner", "TextTower", "TimmClassifier", "VisionLanguageModel",
           "ZeroShotClassifier", "create_vlm"]
