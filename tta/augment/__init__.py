"""Test-time views: crop + flip and AugMix on the device, seeded per sample."""

from tta.augment.views import VIEW_KINDS, make_views

__all__ = ["VIEW_KINDS", "make_views"]
