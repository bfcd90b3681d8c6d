"""DiffTPT as a callback: TPT's plumbing, plus diffusion views from a cached image-variation pipeline."""

from __future__ import annotations

import time

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from typing_extensions import override

from tta.augment.diffusion import DiffusionViewGenerator
from tta.callbacks.base import EpisodicTTA, sample_seed
from tta.methods.difftpt import COSINE_READINGS, difftpt_adapt
from tta.models.prompt import PromptLearner
from tta.validation import check_number


class DiffTPT(EpisodicTTA):
    """Test-time prompt tuning over conventional and diffusion views. See :mod:`tta.methods.difftpt`.

    Defaults as in the reference: the original + 64 conventional views (``n_views=65``) + the
    generator's 63 diffusion views = 128 candidates; the cosine filter keeps 80% of the 127 others
    (101) plus the original (``reading``
    "logits", the reference code, or "features", the paper's text), the entropy filter 30% of
    those; 4 AdamW steps at lr 5e-3; prediction on the original.

    Diffusion views come from ``generator`` (:class:`tta.augment.diffusion.DiffusionViewGenerator`),
    loaded on the module's device when prediction starts, conditioned on the whole image as loaded
    squashed to the pipeline's CLIP input size (bicubic, no crop: the reference's conditioning
    image), seeded per sample like the conventional views, resized (bilinear, antialiased) to the
    model's input size. With
    ``pregenerate`` the generator first walks the datamodule's predict dataloader and fills its cache, as the
    reference generates all views ahead of adaptation: the ``adapt_ms`` of the samples then
    excludes generation (its time is in ``generation_s``); otherwise views are generated (or read
    from the cache) inline, and ``adapt_ms`` includes them.
    """

    method_name = "difftpt"
    likely_settings = ("lr",)

    def __init__(
        self,
        generator: DiffusionViewGenerator,
        lr: float = 5e-3,
        steps: int = 4,
        cosine_fraction: float = 0.8,
        selection: float = 0.3,
        reading: str = "logits",
        ctx_init: str = "a photo of a",
        n_views: int = 65,
        views: str = "crop_flip",
        pregenerate: bool = False,
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
        if not isinstance(generator, DiffusionViewGenerator):
            raise TypeError(
                f"generator must be a tta.augment.diffusion.DiffusionViewGenerator, got {type(generator).__name__}"
            )
        check_number("lr", lr, 0, low_open=True)
        check_number("steps", steps, 1, integer=True)
        # kept fractions: of the diffusion views by cosine, then of the candidates by entropy
        check_number("cosine_fraction", cosine_fraction, 0, 1, low_open=True)
        check_number("selection", selection, 0, 1, low_open=True)
        if reading not in COSINE_READINGS:
            raise ValueError(f"reading must be one of {COSINE_READINGS}, got {reading!r}")
        if pregenerate and generator.cache_dir is None:
            raise ValueError("pregenerate stores the views in the generator's cache: give the generator a cache_dir")
        self.generator, self.lr, self.steps, self.reading = generator, lr, steps, reading
        self.cosine_fraction, self.selection, self.ctx_init = cosine_fraction, selection, ctx_init
        self.pregenerate, self.checkpoint_text = pregenerate, checkpoint_text
        self.prompt: PromptLearner | None = None
        self.generation_s = 0.0  # wall time of the pre-pass

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_predict_start(trainer, pl_module)
        if self.pregenerate:
            # a fresh loader: iterating the trainer's own one would advance the loop's batch sampler
            if trainer.datamodule is None:
                raise ValueError(
                    "pregenerate walks the datamodule's predict_dataloader(): call "
                    "trainer.predict(module, datamodule=...), or fill the cache yourself with "
                    "generator.fill_cache(batches, sample_seed) and pregenerate=False"
                )
            start = time.perf_counter()
            with torch.inference_mode(False):
                self.generator.fill_cache(
                    trainer.datamodule.predict_dataloader(), lambda i: sample_seed(self._run_seed, i), pl_module.device
                )
            self.generation_s = time.perf_counter() - start

    @override
    def setup_method(self, pl_module: pl.LightningModule) -> None:
        self.generator.load(pl_module.device)
        self.prompt = PromptLearner(pl_module.vlm, pl_module.class_names, self.ctx_init).to(pl_module.device)

    @override
    @torch.no_grad()
    def encode_views(
        self,
        pl_module: pl.LightningModule,
        originals: list[torch.Tensor],
        images: torch.Tensor,
        seeds: list[int],
        indices: list[int],
    ) -> torch.Tensor:
        """``B x (n_views + generator.n_views) x D``: the conventional views (through the view store),
        then the diffusion views (conditioned on each whole image as loaded, squashed to the pipeline's
        CLIP input size; the generator's own cache keeps their pixels)."""
        conventional = super().encode_views(pl_module, originals, images, seeds, indices)
        vlm = pl_module.vlm
        generated = self.generator.views(self.generator.squash(originals, images.device), seeds)  # B x G x 3 x S x S
        pixels = generated.flatten(0, 1).to(images.dtype) / 255
        if tuple(pixels.shape[-2:]) != tuple(vlm.image_size):
            pixels = F.interpolate(pixels, size=vlm.image_size, mode="bilinear", antialias=True, align_corners=False)
        with self.autocast(images.device):
            diffusion = vlm.encode_image(pixels, batch_size=self.view_batch_size)
        diffusion = diffusion.to(conventional.dtype).view(len(seeds), self.generator.n_views, -1)
        return torch.cat([conventional, diffusion], dim=1)

    @override
    def adapt(self, pl_module: pl.LightningModule, view_features: torch.Tensor) -> torch.Tensor:
        device = view_features.device
        return difftpt_adapt(
            self.prompt,
            view_features,
            pl_module.vlm.logits,
            n_conventional=self.n_views - 1,
            lr=self.lr,
            steps=self.steps,
            cosine_fraction=self.cosine_fraction,
            selection=self.selection,
            reading=self.reading,
            autocast=self.autocast(device),
            scaler=self.grad_scaler,
            checkpoint=self.checkpoint_text,
        ).logits
