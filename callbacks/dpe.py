"""DPE as a callback: evolving textual and visual prototypes, two residuals learned per sample."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from typing_extensions import override

from tta.callbacks.online import OnlineTTA, check_confident_views
from tta.methods.dpe import ENTROPY_NORMS, PREDICTION_VIEWS, DPEState
from tta.methods.tda import CONFIDENT_FRACTION
from tta.validation import OptionError, check_number


class DPE(OnlineTTA):
    """DPE (defaults as the reference's ImageNet configuration, ``configs/imagenet.yaml``, with its
    ImageNet views: 64 AugMix views, the 10% most confident averaged, the prediction on the original;
    the fine-grained sets run on the original alone, ``n_views=1``). See :mod:`tta.methods.dpe`.

    Only DPE's own residuals and prototypes are learned: the model is never touched.
    ``prediction_views``: ``"original"`` predicts from the original view (the reference on every set but
    ImageNet-A); ``"confident"`` from the confident views summarised again (its ImageNet-A).
    ``entropy_norm``: ``"log2"`` divides the natural-log entropy by ``log2(C)`` as the reference (the
    text-update threshold 0.1 is then 0.144 of the maximum entropy); ``"ln"`` by ``ln C``.
    """

    method_name = "dpe"

    def __init__(
        self,
        shot_capacity: int = 3,
        alpha: float = 6.0,
        beta: float = 5.0,
        lr_text: float = 6e-4,
        lr_image: float = 6e-4,
        align_weight: float = 0.5,
        text_update_threshold: float = 0.1,
        prediction_views: str = "original",
        entropy_norm: str = "log2",
        continual: bool = False,
        n_views: int = 64,
        views: str = "augmix",
        images_per_step: int = 16,
        view_batch_size: int = 64,
        seed: int | None = None,
        view_store: str | None = None,
    ) -> None:
        super().__init__(
            continual=continual,
            n_views=n_views,
            views=views,
            images_per_step=images_per_step,
            view_batch_size=view_batch_size,
            seed=seed,
            view_store=view_store,
        )
        check_confident_views(n_views, CONFIDENT_FRACTION)
        check_number("shot_capacity", shot_capacity, 1, integer=True)
        check_number("alpha", alpha, 0)
        check_number("beta", beta, 0)
        check_number("lr_text", lr_text, 0)
        check_number("lr_image", lr_image, 0)
        check_number("align_weight", align_weight, 0)
        check_number("text_update_threshold", text_update_threshold, 0)
        if prediction_views not in PREDICTION_VIEWS:
            raise OptionError("prediction_views", f"must be one of {PREDICTION_VIEWS}, got {prediction_views!r}")
        if entropy_norm not in ENTROPY_NORMS:
            raise OptionError("entropy_norm", f"must be one of {ENTROPY_NORMS}, got {entropy_norm!r}")
        self.shot_capacity, self.alpha, self.beta = shot_capacity, alpha, beta
        self.lr_text, self.lr_image, self.align_weight = lr_text, lr_image, align_weight
        self.text_update_threshold, self.prediction_views = text_update_threshold, prediction_views
        self.entropy_norm = entropy_norm

    def dpe_options(self) -> dict[str, Any]:
        """The state's options, as this callback holds them."""
        names = (
            "shot_capacity",
            "alpha",
            "beta",
            "lr_text",
            "lr_image",
            "align_weight",
            "text_update_threshold",
            "prediction_views",
            "entropy_norm",
        )
        return {name: getattr(self, name) for name in names}

    @override
    def new_state(self, pl_module: pl.LightningModule) -> DPEState:
        # the reference's 100. is CLIP's logit scale; the model's own is used (100 for CLIP ViT-B/16)
        return DPEState(pl_module.text_features().float(), float(pl_module.vlm.logit_scale), **self.dpe_options())
