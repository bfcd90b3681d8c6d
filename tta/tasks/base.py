"""What the LightningModules over a vision-language model share."""

from __future__ import annotations

from tta.models.vlm import VisionLanguageModel


class OverVLM:
    """Mixin of the LightningModules built over a :class:`VisionLanguageModel` ``self.vlm``."""

    vlm: VisionLanguageModel

    @property
    def model_name(self) -> str:
        """The name the prediction writer records as ``model``."""
        return self.vlm.name

    @property
    def input_size(self) -> int:
        """The image size the model expects: the default image (or cell) size of the data."""
        return self.vlm.image_size[0]

    @property
    def preprocessing(self) -> dict[str, int | str]:
        """The model's own resizing: the defaults of the data's ``image_size``, ``resize_mode`` and
        ``interpolation``."""
        return self.vlm.preprocessing
