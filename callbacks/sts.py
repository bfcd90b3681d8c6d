"""STS as a callback: the spectral basis is built once per ``predict``; gamma is per image."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from typing_extensions import override

from tta.callbacks.base import EpisodicTTA
from tta.methods.sts import FINAL_RULES, spectral_basis, sts_adapt
from tta.validation import check_number


class STS(EpisodicTTA):
    """Spectrum-aware test-time steering. See :mod:`tta.methods.sts`.

    Defaults as the paper states them (docs/methods.md, "STS: what the paper states"): one AdamW
    step at lr 5e-3 on coefficients of the orthonormal basis (no scaling by the singular values),
    the prediction averaged over the kept views (``final="kept_average"``). Options where the
    sources disagree: ``center`` (mean-centre the class embeddings before the SVD; default False),
    ``squared_norm`` (penalty ``||B^T gamma||^2`` instead of the norm; default False), ``final``
    ("original": predict on the original view, the TPT/TPS rule).
    """

    method_name = "sts"
    likely_settings = ("lr",)

    def __init__(
        self,
        lr: float = 5e-3,
        steps: int = 1,
        selection: float = 0.1,
        lam: float = 1.0,
        squared_norm: bool = False,
        final: str = "kept_average",
        center: bool = False,
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
        if final not in FINAL_RULES:
            raise ValueError(f"final must be one of {FINAL_RULES}, got {final!r}")
        check_number("lr", lr, 0, low_open=True)
        check_number("steps", steps, 1, integer=True)
        check_number("selection", selection, 0, 1, low_open=True)  # the kept fraction of views
        check_number("lam", lam, 0)
        self.lr, self.steps, self.selection, self.lam = lr, steps, selection, lam
        self.squared_norm, self.final, self.center = squared_norm, final, center
        self.class_features: torch.Tensor | None = None
        self.basis: torch.Tensor | None = None

    @override
    def setup_method(self, pl_module: pl.LightningModule) -> None:
        self.class_features = pl_module.text_features().clone().float()
        self.basis = spectral_basis(self.class_features, center=self.center)

    @override
    def adapt(self, pl_module: pl.LightningModule, view_features: torch.Tensor) -> torch.Tensor:
        return sts_adapt(
            view_features,
            self.class_features,
            self.basis,
            pl_module.vlm.logits,
            lr=self.lr,
            steps=self.steps,
            selection=self.selection,
            lam=self.lam,
            squared_norm=self.squared_norm,
            final=self.final,
        ).logits
