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

Every image read from a file goes through :func:`decode`, which decodes it as the reference
methods do where that is faithful and refuses it, naming the file, where it is not.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch.utils.data import default_collate
from torchvision.transforms.functional import pil_to_tensor
from torchvision.transforms.v2 import InterpolationMode

from tta.validation import check_number

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
        check_number("image_size", self.size, 1, integer=True)  # pixels
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


#: Modes decoded as the reference methods decode every image (torchvision's ``pil_loader``:
#: ``Image.open(f).convert("RGB")``), which is faithful for them.
REFERENCE_MODES = frozenset({"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB"})
#: Unsigned 16-bit grey in Pillow's byte orders; ``convert("RGB")`` clips these values to white.
GREY_16_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})


class UnsupportedImageError(ValueError):
    """An image whose pixels :func:`decode` would have to guess at; ``reason`` says what they are."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path, self.reason = str(path), reason
        super().__init__(f"cannot decode the image {path}: {reason}; convert it to 8-bit RGB")


def _raw_modes(image: Image.Image) -> set[str]:
    """The raw modes (sample layouts) Pillow will unpack ``image`` from, known before it loads the
    pixels: the first of each tile's decoder arguments, where the decoder takes one."""
    first_arguments = (args if isinstance(args, str) else args[0] for *_, args in image.tile if args)
    return {argument for argument in first_arguments if isinstance(argument, str)}


def _grey_bits(image: Image.Image) -> int | None:
    """How many bits the samples of a grey image of mode ``I;16*`` or ``I`` fill, or None where
    the file does not say (32-bit or signed integers)."""
    raw_modes = _raw_modes(image)
    if "I;12" in raw_modes:  # 12-bit TIFF: mode I;16, but values up to 4095
        return 12
    # PGM: Pillow maps its maxval onto 0..65535; older Pillow opens 16-bit PNG as mode I (raw I;16B)
    if image.mode in GREY_16_BIT_MODES or image.format == "PPM" or raw_modes & GREY_16_BIT_MODES:
        return 16
    return None


def decode(path: str | Path, file: BinaryIO | None = None) -> torch.Tensor:
    """The image at ``path`` (or in ``file``, where ``path`` only names it) as RGB ``uint8 3 x H x W``.

    8-bit images decode as the reference methods (TPT and the others) load them, with
    ``Image.open(f).convert("RGB")``, since their published numbers were computed so: grey
    replicated, palettes looked up, alpha dropped without compositing, CMYK / YCbCr / LAB by
    Pillow's formulas (no colour profile), EXIF orientation not applied, the first frame of an
    animated or multi-page file. 16-bit RGB(A) PNG, TIFF and PPM Pillow itself opens as 8-bit
    RGB(A) (the high byte; PPM rounds). Grey deeper than 8 bits, which ``convert("RGB")`` clips
    to white, keeps its 8 high bits too: 16-bit ``v >> 8`` (so a 16-bit picture decodes alike in
    grey and in RGB PNG or TIFF), 12-bit TIFF ``v >> 4``. Float images (mode F) and 32-bit or
    signed integer ones (mode I, but from 16-bit PGM or PNG) have no range to scale by, so they
    raise :class:`UnsupportedImageError`, as does any mode not named here.
    """
    with Image.open(file if file is not None else path) as image:
        if image.mode in REFERENCE_MODES:
            return pil_to_tensor(image.convert("RGB"))
        if image.mode == "La":  # premultiplied grey + alpha: convert("RGB") fails; LA unpremultiplies, as for RGBa
            return pil_to_tensor(image.convert("LA").convert("RGB"))
        if image.mode in (*GREY_16_BIT_MODES, "I") and (bits := _grey_bits(image)) is not None:
            return torch.from_numpy((np.asarray(image) >> (bits - 8)).astype(np.uint8)).repeat(3, 1, 1)
        reason = {
            "F": "floating-point pixels (mode F) of no known range",
            "I": "32-bit or signed integer pixels (mode I) of no known range",
        }.get(image.mode, f"pixels in mode {image.mode}, which decode does not know")
    raise UnsupportedImageError(path, reason)


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
