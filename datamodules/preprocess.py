"""How an image as loaded becomes the model's input, and how batches carry both.

Every datamodule resizes images the way the model it serves was trained to see them: its size,
resize mode and interpolation (open_clip's ``preprocess_cfg``; timm's data config) come from the
model (``tta-predict`` fills ``data.image_size``, ``data.resize_mode`` and
``data.interpolation`` from it when they are ``null``); the model wrapper applies the mean/std.

Resize modes (open_clip's names):

- ``"shortest"``: the shorter side resized to the size, then the centre crop (CLIP, TPT's base
  transform);
- ``"squash"``: both sides resized to the size, the aspect ratio not kept (SigLIP);
- ``"longest"``: the longer side resized to the size, then padded with black to a square.

Classification batches carry ``original`` beside ``image``: the images as decoded (uint8
``3 x H_i x W_i``, sizes differ, so a list), from which view-based methods crop their views as
the reference methods do (see ``tta.augment.views``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch.utils.data import default_collate
from torchvision.transforms.functional import pil_to_tensor
from torchvision.transforms.v2 import InterpolationMode

RESIZE_MODES = ("shortest", "squash", "longest")
INTERPOLATIONS = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR}
#: The batch key of the images as decoded (a list: sizes differ within a batch).
ORIGINAL = "original"


@dataclass(frozen=True)
class Preprocess:
    """``uint8 3 x H x W`` image as decoded -> float ``3 x size x size`` in [0, 1] (not normalised)."""

    size: int
    resize_mode: str = "shortest"
    interpolation: str = "bicubic"

    def __post_init__(self) -> None:
        if int(self.size) < 1:
            raise ValueError(f"image_size must be a positive number of pixels, got {self.size}: fix data.image_size")
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(
                f"unknown resize_mode {self.resize_mode!r}: set data.resize_mode to one of {list(RESIZE_MODES)} "
                "(or null: the model's own)"
            )
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"unknown interpolation {self.interpolation!r}: set data.interpolation to one of "
                f"{list(INTERPOLATIONS)} (or null: the model's own)"
            )

    def __call__(self, original: torch.Tensor) -> torch.Tensor:
        """``original``: uint8 ``3 x H x W``; resized in uint8 (as PIL does), then scaled to [0, 1]."""
        size, interpolation = int(self.size), INTERPOLATIONS[self.interpolation]
        height, width = original.shape[-2:]
        if self.resize_mode == "squash":
            resized = TF.resize(original, [size, size], interpolation=interpolation, antialias=True)
        elif self.resize_mode == "shortest":
            resized = TF.center_crop(TF.resize(original, size, interpolation=interpolation, antialias=True), size)
        else:  # longest side to size, then pad to a square (open_clip's ResizeKeepRatio + CenterCropOrPad)
            scale = size / max(height, width)
            shape = [max(1, round(height * scale)), max(1, round(width * scale))]
            resized = TF.center_crop(TF.resize(original, shape, interpolation=interpolation, antialias=True), size)
        return resized.float() / 255


def decode(path: Path) -> torch.Tensor:
    """The image file as RGB ``uint8 3 x H x W`` (grey and RGBA converted)."""
    with Image.open(path) as image:
        return pil_to_tensor(image.convert("RGB"))


def classification_sample(
    original: torch.Tensor, preprocess: Preprocess, label: int | torch.Tensor, index: int, domain: str
) -> dict:
    """One sample of the classification batch contract: the model's input beside the original."""
    return {
        "image": preprocess(original),
        ORIGINAL: original,
        "label": torch.as_tensor(label),
        "index": torch.tensor(index),
        "domain": domain,
    }


def collate_with_originals(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """PyTorch's default collate for everything but ``original``, which stays a list."""
    originals = [sample[ORIGINAL] for sample in samples]
    batch = default_collate([{k: v for k, v in sample.items() if k != ORIGINAL} for sample in samples])
    batch[ORIGINAL] = originals
    return batch
