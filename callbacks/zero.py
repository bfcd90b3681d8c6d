"""ZERO as a callback: confident views vote at zero temperature; no backward pass."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from typing_extensions import override

from tta.callbacks.base import EpisodicTTA
from tta.methods.zero import TIE_FALLBACKS, ZERO_OUTPUTS, zero_predict
from tta.validation import OptionError, check_number


class ZERO(EpisodicTTA):
    """ZERO (defaults as the reference ``ttas/zero.py``: 64 crop-and-flip views on every data set,
    ``gamma`` 0.3 of them kept, greedy tie-break). See :mod:`tta.methods.zero`.

    ``tie_fallback``: ``"reference"`` reproduces the reference's last-resort tie-break (its mask
    indexes classes from the end); ``"tied"`` picks among the tied classes. ``output``: ``"votes"``
    gives the vote shares as probabilities, ``"counts"`` the vote counts as logits (tta-vlm's
    reading); the predicted class is the same.
    """

    method_name = "zero"

    def __init__(
        self,
        gamma: float = 0.3,
        tie_fallback: str = "reference",
        output: str = "votes",
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
        check_number("gamma", gamma, 0, 1, low_open=True)  # the kept fraction of views
        if tie_fallback not in TIE_FALLBACKS:
            raise OptionError("tie_fallback", f"must be one of {TIE_FALLBACKS}, got {tie_fallback!r}")
        if output not in ZERO_OUTPUTS:
            raise OptionError("output", f"must be one of {ZERO_OUTPUTS}, got {output!r}")
        self.gamma, self.tie_fallback, self.output = gamma, tie_fallback, output

    @override
    def adapt(self, pl_module: pl.LightningModule, view_features: torch.Tensor) -> torch.Tensor:
        text = pl_module.text_features()
        with self.autocast(view_features.device):  # the cosines in the autocast dtype, as the reference's votes
            cosines = view_features @ text.T
            logits = pl_module.vlm.logits(view_features, text)
        return zero_predict(cosines, logits, self.gamma, self.tie_fallback, self.output).logits
