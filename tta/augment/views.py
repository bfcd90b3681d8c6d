"""Test-time views on the device, cropped from each image as loaded, seeded per sample.

``make_views(originals, images, n_views, seeds, kind)`` returns ``B x V x 3 x H x W``: view 0 is
the model's input ``images[b]`` (the resized centre crop of the image, the reference's base
transform); views 1..V-1 are random crops of ``originals[b]``, the image as decoded (full
resolution, any size), as the reference crops them from the PIL image it loaded, not from the
224 px centre crop (which would narrow the field of view and upsample small crops of it).

- ``"crop_flip"``: RandomResizedCrop (scale 0.08-1, ratio 3/4-4/3, bilinear) + horizontal flip,
  the ImageNet-type protocol of TPT;
- ``"augmix"``: the same crop and flip, then AugMix (3 chains of 1-3 operations at severity 1,
  Dirichlet chain weights, Beta mixing with the cropped view), the fine-grained protocol.

Randomness: each sample's boxes, flips and AugMix plans come from its own ``torch.Generator``
seeded with ``seeds[b]`` (drawn on the CPU: a few numbers per view), with torchvision's
RandomResizedCrop sampling (up to 10 tries per view, then its central-crop fallback), so a
sample's views do not depend on the batch it is in.

Pixels: each image is moved to the device once; its boxes are resized there with torch's
antialiased bilinear interpolation (torchvision's ``resized_crop(..., antialias=True)``, PIL's
filter), so every view is torchvision's RandomResizedCrop output on the same box up to float
rounding; flips and AugMix run batched over all views of the batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

VIEW_KINDS = ("crop_flip", "augmix")
#: RandomResizedCrop's defaults (torchvision, as TPT uses it).
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)


def crop_boxes(
    g: torch.Generator,
    n: int,
    height: int,
    width: int,
    scale: tuple[float, float] = CROP_SCALE,
    ratio: tuple[float, float] = CROP_RATIO,
    attempts: int = 10,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` RandomResizedCrop boxes of a ``height x width`` image and their flips.

    Returns ``boxes`` (``n x 4`` float: left, top, width, height in pixels) and ``flip`` (``n``
    bool). torchvision's sampling: up to ``attempts`` (area, log-ratio) draws per view, the first
    that fits wins; if none fits, its central crop (the whole image clamped to the ratio range).
    """
    area = height * width
    target = area * torch.empty(n, attempts).uniform_(scale[0], scale[1], generator=g)
    log_ratio = torch.empty(n, attempts).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=g)
    aspect = torch.exp(log_ratio)
    w = torch.sqrt(target * aspect).round()
    h = torch.sqrt(target / aspect).round()
    valid = (w <= width) & (h <= height) & (w > 0) & (h > 0)
    first = torch.where(valid.any(1), valid.float().argmax(1), torch.full((n,), -1))
    pick = first.clamp(min=0).unsqueeze(1)
    found = first >= 0
    # the central-crop fallback of torchvision's RandomResizedCrop.get_params
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fallback_w, fallback_h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        fallback_w, fallback_h = round(height * ratio[1]), height
    else:
        fallback_w, fallback_h = width, height
    w = torch.where(found, w.gather(1, pick).squeeze(1), torch.full((n,), float(fallback_w)))
    h = torch.where(found, h.gather(1, pick).squeeze(1), torch.full((n,), float(fallback_h)))
    x0 = torch.floor(torch.rand(n, generator=g) * (width - w + 1))
    y0 = torch.floor(torch.rand(n, generator=g) * (height - h + 1))
    x0 = torch.where(found, x0, torch.full((n,), float((width - fallback_w) // 2)))
    y0 = torch.where(found, y0, torch.full((n,), float((height - fallback_h) // 2)))
    flip = torch.rand(n, generator=g) < 0.5
    return torch.stack([x0, y0, w, h], dim=1), flip


def resized_crops(image: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``n x C x size`` crops of one image (``C x H x W`` float) at ``boxes`` (``n x 4``: left, top,
    width, height in whole pixels), each resized with torch's antialiased bilinear interpolation:
    torchvision's ``resized_crop(..., antialias=True)`` on the device, box by box.

    Box by box because each box has its own scale: one batched product per axis for all boxes
    (dense resampling matrices) gives the same pixels but costs ``n x size x H x W`` operations,
    2.3x the time of this loop on a CPU for a 500 x 375 image, and one ``roi_align`` call averages
    with a box filter (0.03 off torchvision's pixels) for no gain in time
    (``benchmarks/results/views_cpu.md``).
    """
    return torch.cat(
        [
            F.interpolate(
                image[None, :, top : top + height, left : left + width],
                size=size,
                mode="bilinear",
                antialias=True,
                align_corners=False,
            )
            for left, top, width, height in boxes.long().tolist()
        ]
    )


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


def _as_float(original: torch.Tensor, device: torch.device) -> torch.Tensor:
    if original.ndim != 3 or original.shape[0] != 3:
        raise ValueError(
            f"an original image must be 3 x H x W (RGB), got shape {tuple(original.shape)}: the datamodule's "
            "'original' is a list of the images as decoded (see tta.datamodules)"
        )
    original = original.to(device)
    return original.float() / 255 if original.dtype == torch.uint8 else original.float()


def make_views(
    originals: Sequence[torch.Tensor],
    images: torch.Tensor,
    n_views: int,
    seeds: Sequence[int],
    kind: str = "crop_flip",
) -> torch.Tensor:
    """``B x V x 3 x H x W`` views in [0, 1]: view 0 is ``images[b]`` (the model's input, ``B x 3 x H
    x W``), views 1..V-1 random crops of ``originals[b]`` (``3 x H_b x W_b``, uint8 or float in
    [0, 1]: the image as loaded), resized to ``H x W`` on the images' device."""
    if kind not in VIEW_KINDS:
        raise ValueError(f"unknown view kind {kind!r}; choose from {VIEW_KINDS}")
    if n_views < 1:
        raise ValueError(f"n_views must be at least 1 (the original), got {n_views}")
    b, _, height, width = images.shape
    if len(seeds) != b or len(originals) != b:
        raise ValueError(
            f"{len(seeds)} seeds and {len(originals)} originals for {b} images: give one of each per image"
        )
    if n_views == 1:
        return images.unsqueeze(1)
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    crops = []
    for original, g in zip(originals, generators):
        pixels = _as_float(original, images.device)
        boxes, flip = crop_boxes(g, n_views - 1, pixels.shape[1], pixels.shape[2])
        views = resized_crops(pixels, boxes, (height, width))
        crops.append(torch.where(flip.to(images.device).view(-1, 1, 1, 1), views.flip(-1), views))
    views = torch.cat(crops).to(images.dtype).clamp(0, 1)
    if kind == "augmix":
        plans = [_augmix_plan(g, n_views - 1) for g in generators]
        plan = {key: torch.cat([p[key] for p in plans]) for key in plans[0]}
        views = _augmix(views, plan)
    return torch.cat([images.unsqueeze(1), views.view(b, n_views - 1, 3, height, width)], dim=1)
