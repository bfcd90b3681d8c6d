"""MTA as a callback: the MeanShift mode of the view embeddings; no backward pass."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from typing_extensions import override

from tta.callbacks.base import EpisodicTTA
from tta.methods.mta import mta_mode
from tta.validation import check_number


class MTA(EpisodicTTA):
    """MeanShift test-time augmentation (defaults as the reference ``mta.py`` and ``main.py``: 64
    crop-and-flip views on every data set, ``lambda_y`` 0.2, ``lambda_q`` 4, bandwidths from the
    30% nearest views, 5 iterations). See :mod:`tta.methods.mta`."""

    method_name = "mta"

    def __init__(
        self,
        lambda_y: float = 0.2,
        lambda_q: float = 4.0,
        neighbour_fraction: float = 0.3,
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
        check_number("lambda_y", lambda_y, 0, low_open=True)  # divides the inlierness scores
        check_number("lambda_q", lambda_q, 0)
        check_number("neighbour_fraction", neighbour_fraction, 0, 1, low_open=True)
        self.lambda_y, self.lambda_q, self.neighbour_fraction = lambda_y, lambda_q, neighbour_fraction

    @override
    def adapt(self, pl_module: pl.LightningModule, view_features: torch.Tensor) -> torch.Tensor:
        vlm, text = pl_module.vlm, pl_module.text_features().float()
        features = view_features.float()
        mode, _ = mta_mode(features, vlm.logits(features, text), self.lambda_y, self.lambda_q, self.neighbour_fraction)
        return vlm.logits(mode, text)
