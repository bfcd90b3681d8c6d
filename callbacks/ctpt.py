"""C-TPT as a callback: TPT's plumbing with the text-feature dispersion term in the loss."""

from __future__ import annotations

from collections.abc import Callable

import torch
from typing_extensions import override

from tta.callbacks.tpt import TPT
from tta.methods.ctpt import dispersion_penalty
from tta.validation import check_number


class CTPT(TPT):
    """Calibrated test-time prompt tuning: TPT's loss minus ``lambda_term`` times the class text
    features' dispersion (defaults as the reference's natural-shift script: ``lambda_term`` 20,
    AugMix views; its fine-grained script: 50, AugMix). See :mod:`tta.methods.ctpt`."""

    method_name = "ctpt"

    def __init__(
        self,
        lambda_term: float = 20.0,
        lr: float = 5e-3,
        steps: int = 1,
        selection: float = 0.1,
        ctx_init: str = "a photo of a",
        n_views: int = 64,
        views: str = "augmix",
        images_per_step: int = 16,
        view_batch_size: int = 64,
        checkpoint_text: bool = False,
        seed: int | None = None,
        view_store: str | None = None,
    ) -> None:
        super().__init__(
            lr=lr,
            steps=steps,
            selection=selection,
            ctx_init=ctx_init,
            n_views=n_views,
            views=views,
            images_per_step=images_per_step,
            view_batch_size=view_batch_size,
            checkpoint_text=checkpoint_text,
            seed=seed,
            view_store=view_store,
        )
        check_number("lambda_term", lambda_term, 0)
        self.lambda_term = lambda_term

    @override
    def text_penalty(self) -> Callable[[torch.Tensor], torch.Tensor]:
        return dispersion_penalty(self.lambda_term)
