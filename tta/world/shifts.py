"""Domain shifts of the offline world, each with severities 1-5.

A shift acts at render time (a :class:`~tta.world.scenes.Style`: outlines only, textured
background) and/or on the pixels afterwards (noise, blur, contrast, hue). Levels are given for
a scene of ``REFERENCE_SIZE`` pixels (the model input); on an image ``scale`` times that size
the spatial ones scale with it (blur sigma, and the noise sigma, so that the noise left after
resizing to the model input is the same), so a shift is a property of the scene, not of the
pixel grid. The severity tables were calibrated by measurement against the default shipped
model so that severity 3 lands between 35% and 65% zero-shot accuracy (see docs/world.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from tta.world.scenes import Style

PixelOp = Callable[[torch.Tensor, float, torch.Generator], torch.Tensor]


def gaussian_noise(images: torch.Tensor, sigma: float, g: torch.Generator) -> torch.Tensor:
    noise = torch.randn(images.shape, generator=g) * sigma
    return (images + noise).clamp(0, 1)


def gaussian_blur(images: torch.Tensor, sigma: float, g: torch.Generator) -> torch.Tensor:
    del g  # deterministic
    radius = max(1, int(3 * sigma + 0.5))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    h, w = images.shape[-2:]
    padded = F.pad(images, (radius, radius, radius, radius), mode="reflect")
    # separable blur as a weighted sum of shifted slices: far faster on CPU than a
    # depthwise conv2d with a long thin kernel
    rows = sum(k * padded[..., i : i + w] for i, k in enumerate(kernel.tolist()))
    return sum(k * rows[..., i : i + h, :] for i, k in enumerate(kernel.tolist()))


def contrast(images: torch.Tensor, factor: float, g: torch.Generator) -> torch.Tensor:
    del g
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    return ((images - mean) * factor + mean).clamp(0, 1)


def hue_jitter(images: torch.Tensor, amount: float, g: torch.Generator) -> torch.Tensor:
    """Rotate every image's hue by +-``amount`` of a full turn (random sign) in YIQ space."""
    n = images.shape[0]
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    theta = sign * amount * 2 * torch.pi
    to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    from_yiq = torch.linalg.inv(to_yiq)
    cos, sin = torch.cos(theta), torch.sin(theta)
    rot = torch.zeros(n, 3, 3)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, -sin, sin, cos
    matrix = from_yiq @ rot @ to_yiq  # n x 3 x 3
    return torch.einsum("nij,njhw->nihw", matrix, images).clamp(0, 1)


@dataclass(frozen=True)
class Shift:
    """A named domain shift: a severity table (index 0 is severity 1) and how it applies."""

    name: str
    levels: tuple[float, float, float, float, float]
    pixel_op: PixelOp | None = None
    style_field: str | None = None  # the Style field the level sets, for render-time shifts
    scales_with_size: bool = False  # the level is in pixels of a REFERENCE_SIZE image
    description: str = field(default="", compare=False)

    def level(self, severity: int) -> float:
        if not 1 <= severity <= 5:
            raise ValueError(f"severity must be an integer in 1..5, got {severity!r}")
        return self.levels[severity - 1]

    def style(self, severity: int) -> Style:
        if self.style_field is None:
            return Style()
        return Style(**{self.style_field: self.level(severity)})

    def apply(self, images: torch.Tensor, severity: int, g: torch.Generator, scale: float = 1.0) -> torch.Tensor:
        """The pixel part of the shift on ``images`` (N x 3 x H x W), which are ``scale`` times
        ``REFERENCE_SIZE`` on a side."""
        if self.pixel_op is None:
            return images
        level = self.level(severity) * (scale if self.scales_with_size else 1.0)
        return self.pixel_op(images, level, g)


SHIFTS: dict[str, Shift] = {
    s.name: s
    for s in (
        Shift(
            "noise",
            (0.09, 0.105, 0.119, 0.143, 0.18),
            gaussian_noise,
            scales_with_size=True,
            description="additive gaussian noise, sigma in [0, 1] pixel units",
        ),
        Shift(
            "blur",
            (2.477, 3.16, 3.947, 4.735, 5.953),
            gaussian_blur,
            scales_with_size=True,
            description="gaussian blur, sigma in pixels",
        ),
        Shift(
            "contrast",
            (0.399, 0.36, 0.308, 0.26, 0.219),
            contrast,
            description="contrast scaled by the factor around the image mean",
        ),
        Shift(
            "sketch",
            (15.011, 11.698, 7.839, 5.455, 1.2),
            style_field="outline_px",
            description="outlines only: a band this many pixels wide inside the silhouette",
        ),
        Shift(
            "texture",
            (0.159, 0.185, 0.217, 0.239, 0.274),
            style_field="texture_alpha",
            description="coloured stripes/checkers blended into the background",
        ),
        Shift(
            "hue",
            (0.063, 0.077, 0.093, 0.108, 0.127),
            hue_jitter,
            description="hue rotated by this fraction of a turn, random sign",
        ),
    )
}
DOMAINS: tuple[str, ...] = ("clean", *SHIFTS)
