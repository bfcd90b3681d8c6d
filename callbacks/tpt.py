"""TPT as a callback: the prompt learner is built once; each batch gets fresh contexts."""

from __future__ import annotations

from collections.abc import Callable

import pytorch_lightning as pl
import torch
from typing_extensions import override

from tta.callbacks.base import EpisodicTTA
from tta.methods.tpt import tpt_adapt
from tta.models.prompt import PromptLearner
from tta.validation import check_number


class TPT(EpisodicTTA):
    """Test-time prompt tuning (defaults: 64 views, 10% kept, 1 AdamW step at lr 5e-3,
    context "a photo of a"). See :mod:`tta.methods.tpt`.

    ``images_per_step`` images are tuned at once, each with its own context; memory grows with
    it times the number of classes. ``checkpoint_text`` recomputes the text tower's blocks in
    the backward pass, for large class lists on a GPU (same result, less memory).
    """

    method_name = "tpt"
    likely_settings = ("lr",)

    def __init__(
        self,
        lr: float = 5e-3,
        steps: int = 1,
        selection: float = 0.1,
        ctx_init: str = "a photo of a",
        n_views: int = 64,
        views: str = "crop_flip",
        images_per_step: int = 16,
        view_batch_size: int = 64,
        checkpoint_text: bool = False,
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
        self.checkpoint_text = checkpoint_text
        check_number("lr", lr, 0, low_open=True)
        check_number("steps", steps, 1, integer=True)
        check_number("selection", selection, 0, 1, low_open=True)  # the kept fraction of views
        self.lr, self.steps, self.selection, self.ctx_init = lr, steps, selection, ctx_init
        self.prompt: PromptLearner | None = None

    @override
    def setup_method(self, pl_module: pl.LightningModule) -> None:
        self.prompt = PromptLearner(pl_module.vlm, pl_module.class_names, self.ctx_init).to(pl_module.device)

    @override
    def adapt(self, pl_module: pl.LightningModule, view_features: torch.Tensor) -> torch.Tensor:
        device = view_features.device
        return tpt_adapt(
            self.prompt,
            view_features,
            pl_module.vlm.logits,
            lr=self.lr,
            steps=self.steps,
            selection=self.selection,
            autocast=self.autocast(device),
            scaler=self.grad_scaler,
            checkpoint=self.checkpoint_text,
            text_penalty=self.text_penalty(),
        ).logits

    def text_penalty(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """A term added to each image's loss from its class text features (none: TPT; C-TPT's dispersion)."""
        return None
