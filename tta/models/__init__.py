"""The model: the vision-language wrapper over open_clip towers, its text tower for prompt
learning, the prompt learner and the model factory. The LightningModules built on it live in
``tta.tasks``."""

from tta.models.factory import SHIPPED_MODELS, create_vlm
from tta.models.prompt import PromptLearner
from tta.models.text_tower import TextTower
from tta.models.vlm import VisionLanguageModel

__all__ = ["SHIPPED_MODELS", "PromptLearner", "TextTower", "VisionLanguageModel", "create_vlm"]
