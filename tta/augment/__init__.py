"""Test-time views: crop + flip and AugMix on the device, seeded per sample; diffusion views (DiffTPT)."""

from tta.augment.diffusion import TINY_PIPELINE, DiffusionViewGenerator
from tta.augment.views import VIEW_KINDS, make_views

__all__ = ["TINY_PIPELINE", "VIEW_KINDS", "DiffusionViewGenerator", "make_views"]
