"""TDA as a callback: positive and negative caches of the stream's features; no backward pass."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from typing_extensions import override

from tta.callbacks.online import OnlineTTA, check_confident_views
from tta.methods.tda import CACHE_DTYPES, CONFIDENT_FRACTION, ENTROPY_NORMS, TDAState
from tta.validation import OptionError, check_number


class TDA(OnlineTTA):
    """TDA (defaults as the reference's ImageNet configuration, ``configs/imagenet.yaml``, with the
    views it gives ImageNet-A/-V2/-R/-Sketch: 64 AugMix views, the 10% most confident averaged; the
    reference runs ImageNet itself and the fine-grained sets on the original alone, ``n_views=1``).
    See :mod:`tta.methods.tda`.

    ``entropy_norm``: ``"log2"`` divides the natural-log entropy by ``log2(C)`` as the reference
    (the negative cache's window then covers 0.29-0.72 of the maximum entropy); ``"ln"`` by ``ln C``.
    ``cache_dtype``: ``"float16"`` computes the cache logits in half precision as the reference's
    fp16 CLIP does; ``"float32"`` in float32.
    """

    method_name = "tda"

    def __init__(
        self,
        pos_enabled: bool = True,
        pos_shot_capacity: int = 3,
        pos_alpha: float = 2.0,
        pos_beta: float = 5.0,
        neg_enabled: bool = True,
        neg_shot_capacity: int = 2,
        neg_alpha: float = 0.117,
        neg_beta: float = 1.0,
        neg_entropy_lower: float = 0.2,
        neg_entropy_upper: float = 0.5,
        neg_mask_lower: float = 0.03,
        neg_mask_upper: float = 1.0,
        entropy_norm: str = "log2",
        cache_dtype: str = "float16",
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
        for name, flag in (("pos_enabled", pos_enabled), ("neg_enabled", neg_enabled)):
            if not isinstance(flag, bool):
                raise OptionError(name, f"must be true or false, got {flag!r}")
        check_number("pos_shot_capacity", pos_shot_capacity, 1, integer=True)
        check_number("neg_shot_capacity", neg_shot_capacity, 1, integer=True)
        weights = {"pos_alpha": pos_alpha, "pos_beta": pos_beta, "neg_alpha": neg_alpha, "neg_beta": neg_beta}
        for name, value in weights.items():
            check_number(name, value, 0)  # the caches' weights and the sharpness of their kernels
        check_number("neg_entropy_lower", neg_entropy_lower, 0)
        check_number("neg_entropy_upper", neg_entropy_upper, neg_entropy_lower, low_open=True)
        check_number("neg_mask_lower", neg_mask_lower, 0)
        check_number("neg_mask_upper", neg_mask_upper, neg_mask_lower, low_open=True)
        if entropy_norm not in ENTROPY_NORMS:
            raise OptionError("entropy_norm", f"must be one of {ENTROPY_NORMS}, got {entropy_norm!r}")
        if cache_dtype not in CACHE_DTYPES:
            raise OptionError("cache_dtype", f"must be one of {tuple(CACHE_DTYPES)}, got {cache_dtype!r}")
        self.pos_enabled, self.pos_shot_capacity, self.pos_alpha, self.pos_beta = (
            pos_enabled,
            pos_shot_capacity,
            pos_alpha,
            pos_beta,
        )
        self.neg_enabled, self.neg_shot_capacity, self.neg_alpha, self.neg_beta = (
            neg_enabled,
            neg_shot_capacity,
            neg_alpha,
            neg_beta,
        )
        self.neg_entropy_lower, self.neg_entropy_upper = neg_entropy_lower, neg_entropy_upper
        self.neg_mask_lower, self.neg_mask_upper = neg_mask_lower, neg_mask_upper
        self.entropy_norm, self.cache_dtype = entropy_norm, cache_dtype

    def tda_options(self) -> dict[str, Any]:
        """The state's options (TDA's caches), as this callback holds them."""
        names = (
            "pos_enabled",
            "pos_shot_capacity",
            "pos_alpha",
            "pos_beta",
            "neg_enabled",
            "neg_shot_capacity",
            "neg_alpha",
            "neg_beta",
            "neg_entropy_lower",
            "neg_entropy_upper",
            "neg_mask_lower",
            "neg_mask_upper",
            "entropy_norm",
            "cache_dtype",
        )
        return {name: getattr(self, name) for name in names}

    @override
    def new_state(self, pl_module: pl.LightningModule) -> TDAState:
        # the reference's 100. is CLIP's logit scale; the model's own is used (100 for CLIP ViT-B/16)
        return TDAState(pl_module.text_features().float(), float(pl_module.vlm.logit_scale), **self.tda_options())
