"""DOTA as a callback: online Gaussian class distributions mixed with the zero-shot logits; no backward pass."""

from __future__ import annotations

import pytorch_lightning as pl
from typing_extensions import override

from tta.callbacks.online import OnlineTTA, check_confident_views
from tta.methods.dota import COMPUTE_DTYPES, KEPT_FRACTION, MEAN_INITS, DOTAState
from tta.validation import OptionError, check_number


class DOTA(OnlineTTA):
    """DOTA (defaults as the reference's ImageNet run, ``configs/vit/imagenet.yaml`` and ``dota.py``:
    the original image only, ``epsilon`` 1e-4, ``sigma`` 0.002, ``eta`` 0.2, ``rho`` 0.005; its
    ImageNet variants use 64 AugMix views, of which the 10% of lowest entropy are kept). See
    :mod:`tta.methods.dota`.

    ``mean_init``: ``"constant"`` starts every class mean at 0.001 (the reference's ``main``);
    ``"text"`` at the class text features. ``compute_dtype``: ``"float16"`` reproduces the
    reference's fp16 features, inverse covariance and scores whatever the trainer's precision;
    ``"float32"`` computes all in fp32.
    """

    method_name = "dota"

    def __init__(
        self,
        epsilon: float = 1e-4,
        sigma: float = 0.002,
        eta: float = 0.2,
        rho: float = 0.005,
        mean_init: str = "constant",
        compute_dtype: str = "float16",
        continual: bool = False,
        n_views: int = 1,
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
        check_confident_views(n_views, KEPT_FRACTION)
        check_number("epsilon", epsilon, 0, 1, low_open=True)  # shrinkage towards I: 0 may leave it singular
        check_number("sigma", sigma, 0, low_open=True)  # the initial covariance sigma * I is inverted
        check_number("eta", eta, 0)
        check_number("rho", rho, 0)
        if mean_init not in MEAN_INITS:
            raise OptionError("mean_init", f"must be one of {MEAN_INITS}, got {mean_init!r}")
        if compute_dtype not in COMPUTE_DTYPES:
            raise OptionError("compute_dtype", f"must be one of {tuple(COMPUTE_DTYPES)}, got {compute_dtype!r}")
        self.epsilon, self.sigma, self.eta, self.rho = epsilon, sigma, eta, rho
        self.mean_init, self.compute_dtype = mean_init, compute_dtype

    @override
    def new_state(self, pl_module: pl.LightningModule) -> DOTAState:
        return DOTAState(
            pl_module.text_features().float(),
            float(pl_module.vlm.logit_scale),
            epsilon=self.epsilon,
            sigma=self.sigma,
            eta=self.eta,
            rho=self.rho,
            mean_init=self.mean_init,
            compute_dtype=self.compute_dtype,
        )

    @override
    def non_finite_hint(self) -> str:
        # the fp16 scores grow as 1 / epsilon: a smaller shrinkage, not a larger one, overflows them
        return (
            f"raise epsilon (now {self.epsilon!r}; tta.callbacks.dota.epsilon), or compute in float32 "
            "(tta.callbacks.dota.compute_dtype=float32)"
        )
