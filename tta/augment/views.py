"""Test-time views on the device, batched over images and views, seeded per sample.

``make_views(images, n_views, seeds, kind)`` returns ``B x V x 3 x H x W``; view 0 is the
original image, views 1..V-1 are random. Each sample's random parameters come from its own
``torch.Generator`` seeded with ``seeds[b]``, so a sample's views do not depend on the batch
it is in. Parameters are drawn on the CPU (a few numbers per view); the pixels are resampled on
the images' device in one ``grid_sample`` call for the whole batch.

- ``"crop_flip"``: RandomResizedCrop (scale 0.08-1, ratio 3/4-4/3) + horizontal flip, the
  ImageNet-type protocol of TPT;
- ``"augmix"``: the same crop and flip, then AugMix (3 chains of 1-3 operations at severity 1,
  Dirichlet chain weights, Beta mixing with the cropped view), the fine-grained protocol.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

VIEW_KINDS = ("crop_flip", "augmix")


def _crop_flip_theta(
    g: torch.Generator,
    n: int,
    height: int,
    width: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    attempts: int = 10,
) -> torch.Tensor:
    """``n x 2 x 3`` affine matrices of RandomResizedCrop + horizontal flip (torchvision's
    sampling: up to ``attempts`` tries per view, then the whole image)."""
    area = height * width
    target = area * torch.empty(n, attempts).uniform_(scale[0], scale[1], generator=g)
    log_ratio = torch.empty(n, attempts).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=g)
    aspect = torch.exp(log_ratio)
    w = torch.sqrt(target * aspect).round()
    h = torch.sqrt(target / aspect).round()
    valid = (w <= width) & (h <= height) & (w > 0) & (h > 0)
    first = torch.where(valid.any(1), valid.float().argmax(1), torch.full((n,), -1))
    pick = first.clamp(min=0).unsqueeze(1)
    w = torch.where(first >= 0, w.gather(1, pick).squeeze(1), torch.full((n,), float(width)))
    h = torch.where(first >= 0, h.gather(1, pick).squeeze(1), torch.full((n,), float(height)))
    x0 = torch.floor(torch.rand(n, generator=g) * (width - w + 1))
    y0 = torch.floor(torch.rand(n, generator=g) * (height - h + 1))
    flip = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = flip * w / width
    theta[:, 0, 2] = (2 * x0 + w) / width - 1
    theta[:, 1, 1] = h / height
    theta[:, 1, 2] = (2 * y0 + h) / height - 1
    return theta


def _warp(images: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    grid = F.affine_grid(theta.to(images.device, images.dtype), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


# --- AugMix at severity 1 (TPT's operation list) --------------------------------------------

AUGMIX_OPS = (
    "autocontrast",
    "equalize",
    "rotate",
    "solarize",
    "shear_x",
    "shear_y",
    "translate_x",
    "translate_y",
    "posterize",
)
AUGMIX_CHAINS = 3
AUGMIX_MAX_DEPTH = 3


def _autocontrast(x: torch.Tensor) -> torch.Tensor:
    lo = x.amin(dim=(-2, -1), keepdim=True)
    hi = x.amax(dim=(-2, -1), keepdim=True)
    return torch.where(hi > lo, (x - lo) / (hi - lo).clamp_min(1e-8), x)


def _geometric_theta(op: str, level: torch.Tensor, sign: torch.Tensor, size: int) -> torch.Tensor:
    """Affine matrices (output -> input, normalised coordinates) of rotate/shear/translate."""
    n = level.shape[0]
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    if op == "rotate":
        angle = sign * level * 30 / 10 * math.pi / 180
        theta[:, 0, 0], theta[:, 0, 1] = torch.cos(angle), -torch.sin(angle)
        theta[:, 1, 0], theta[:, 1, 1] = torch.sin(angle), torch.cos(angle)
    elif op == "shear_x":
        theta[:, 0, 1] = sign * level * 0.3 / 10
    elif op == "shear_y":
        theta[:, 1, 0] = sign * level * 0.3 / 10
    elif op == "translate_x":
        theta[:, 0, 2] = sign * torch.floor(level * (size / 3) / 10) * 2 / size
    else:  # translate_y
        theta[:, 1, 2] = sign * torch.floor(level * (size / 3) / 10) * 2 / size
    return theta


def _apply_op(op: str, x: torch.Tensor, level: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    if op == "autocontrast":
        return _autocontrast(x)
    if op == "equalize":
        return TF.equalize(x)
    if op == "solarize":
        threshold = (256 - torch.floor(level * 256 / 10)).to(x.device).view(-1, 1, 1, 1) / 256
        return torch.where(x >= threshold, 1 - x, x)
    if op == "posterize":
        bits = (4 - torch.floor(level * 4 / 10)).to(x.device).view(-1, 1, 1, 1)
        step = 2 ** (8 - bits)
        return torch.floor(torch.floor(x * 255) / step) * step / 255
    return _warp(x, _geometric_theta(op, level, sign, x.shape[-1]))


def _augmix_plan(g: torch.Generator, n: int, severity: int = 1) -> dict[str, torch.Tensor]:
    """Per-view random choices of AugMix: chain depths, operations, levels, signs, weights."""
    shape = (n, AUGMIX_CHAINS, AUGMIX_MAX_DEPTH)
    return {
        "depth": torch.randint(1, AUGMIX_MAX_DEPTH + 1, (n, AUGMIX_CHAINS), generator=g),
        "op": torch.randint(0, len(AUGMIX_OPS), shape, generator=g),
        "level": torch.empty(shape).uniform_(0.1, severity, generator=g),
        "sign": torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0),
        "weights": torch._standard_gamma(torch.ones(n, AUGMIX_CHAINS), generator=g),
        "mix": torch._standard_gamma(torch.ones(n, 2), generator=g),
    }


def _augmix(views: torch.Tensor, plan: dict[str, torch.Tensor]) -> torch.Tensor:
    """AugMix on ``N x 3 x H x W`` views with the per-view ``plan``."""
    weights = plan["weights"] / plan["weights"].sum(1, keepdim=True)  # Dirichlet(1, 1, 1)
    mix = plan["mix"][:, 0] / plan["mix"].sum(1)  # Beta(1, 1)
    mixed = torch.zeros_like(views)
    for chain in range(AUGMIX_CHAINS):
        x = views.clone()
        for step in range(AUGMIX_MAX_DEPTH):
            active = plan["depth"][:, chain] > step
            for k, op in enumerate(AUGMIX_OPS):
                idx = (active & (plan["op"][:, chain, step] == k)).nonzero().squeeze(1)
                if idx.numel():
                    x[idx.to(x.device)] = _apply_op(
                        op, x[idx.to(x.device)], plan["level"][idx, chain, step], plan["sign"][idx, chain, step]
                    ).clamp(0, 1)
        mixed += weights[:, chain].to(views.device).view(-1, 1, 1, 1) * x
    m = mix.to(views.device).view(-1, 1, 1, 1)
    return m * views + (1 - m) * mixed


def make_views(images: torch.Tensor, n_views: int, seeds: Sequence[int], kind: str = "crop_flip") -> torch.Tensor:
    """``B x V x 3 x H x W`` views of raw images (``B x 3 x H x W`` in [0, 1]); view 0 is the original."""
    if kind not in VIEW_KINDS:
        raise ValueError(f"unknown view kind {kind!r}; choose from {VIEW_KINDS}")
    if n_views < 1:
        raise ValueError(f"n_views must be at least 1 (the original), got {n_views}")
    b, _, height, width = images.shape
    if len(seeds) != b:
        raise ValueError(f"{len(seeds)} seeds for {b} images: give one seed per image")
    if n_views == 1:
        return images.unsqueeze(1)
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    theta = torch.cat([_crop_flip_theta(g, n_views - 1, height, width) for g in generators])
    source = images.unsqueeze(1).expand(-1, n_views - 1, -1, -1, -1).reshape(-1, 3, height, width)
    views = _warp(source, theta)
    if kind == "augmix":
        plans = [_augmix_plan(g, n_views - 1) for g in generators]
        plan = {key: torch.cat([p[key] for p in plans]) for key in plans[0]}
        views = _augmix(views, plan)
    return torch.cat([images.unsqueeze(1), views.view(b, n_views - 1, 3, height, width)], dim=1)
