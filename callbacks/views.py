"""The augmentation-only baseline as a callback: confident-view averaging, no tuning."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from typing_extensions import override

from tta.callbacks.base import EpisodicTTA
from tta.methods.views import confident_view_average
from tta.validation import check_number


class ViewAverage(EpisodicTTA):
    """Average the probabilities of the 10% most confident views (same views as TPT/STS)."""

    method_name = "views"

    def __init__(
        self,
        selection: float = 0.1,
        n_views: int = 64,
        views: str = "crop_flip",
        images_per_step: int = 64,
        view_batch_size: int = 64,
        seed: int | None = None,
        view_store: str | None = None,
    ) -> None:
        super().__init__(
            n_views=n_views,
            views=views,
            images_per_step=images_per_step,
            view_batch_size=view_batch_size,
            seed=seed,
            view_store=view_store,
        )
        check_number("selection", selection, 0, 1, low_open=True)  # the kept fraction of views
        self.selection = selection

    @override
    def adapt(self, pl_module: pl.LightningModule, view_features: torch.Tensor) -> torch.Tensor:
        logits = pl_module.vlm.logits(view_features.float(), pl_module.text_features().float())
        return confident_view_average(logits, self.selection)[0]
