"""BoostAdapter as a callback: TDA's caches plus boosting entries from each sample's views; no backward pass."""

from __future__ import annotations

import pytorch_lightning as pl
from typing_extensions import override

from tta.callbacks.tda import TDA
from tta.methods.boostadapter import BoostAdapterState
from tta.validation import OptionError, check_number


class BoostAdapter(TDA):
    """BoostAdapter (defaults as the reference's ImageNet-A configuration, ``configs/imagenet_a.yaml``:
    TDA's caches, ``delta`` 3, 64 crop-and-flip views, the sample summarised by its 10% most confident
    views). On the fine-grained sets the reference summarises by the original view alone
    (``infer_original=True``) and bootstraps from the 64 views; ImageNet itself has one view. See
    :mod:`tta.methods.boostadapter`; the cache options are :class:`~tta.callbacks.tda.TDA`'s.
    """

    method_name = "boostadapter"

    def __init__(
        self,
        delta: int = 3,
        infer_original: bool = False,
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
        views: str = "crop_flip",
        images_per_step: int = 16,
        view_batch_size: int = 64,
        seed: int | None = None,
        view_store: str | None = None,
    ) -> None:
        super().__init__(
            pos_enabled=pos_enabled,
            pos_shot_capacity=pos_shot_capacity,
            pos_alpha=pos_alpha,
            pos_beta=pos_beta,
            neg_enabled=neg_enabled,
            neg_shot_capacity=neg_shot_capacity,
            neg_alpha=neg_alpha,
            neg_beta=neg_beta,
            neg_entropy_lower=neg_entropy_lower,
            neg_entropy_upper=neg_entropy_upper,
            neg_mask_lower=neg_mask_lower,
            neg_mask_upper=neg_mask_upper,
            entropy_norm=entropy_norm,
            cache_dtype=cache_dtype,
            continual=continual,
            n_views=n_views,
            views=views,
            images_per_step=images_per_step,
            view_batch_size=view_batch_size,
            seed=seed,
            view_store=view_store,
        )
        check_number("delta", delta, 0, integer=True)  # the boosted copy's extra slots a class
        if not isinstance(infer_original, bool):
            raise OptionError("infer_original", f"must be true or false, got {infer_original!r}")
        self.delta, self.infer_original = delta, infer_original

    @override
    def new_state(self, pl_module: pl.LightningModule) -> BoostAdapterState:
        # the reference's 100. is CLIP's logit scale; the model's own is used (100 for CLIP ViT-B/16)
        return BoostAdapterState(
            pl_module.text_features().float(),
            float(pl_module.vlm.logit_scale),
            delta=self.delta,
            infer_original=self.infer_original,
            **self.tda_options(),
        )
