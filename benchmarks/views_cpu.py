"""CPU cost of making 64 views per image: cropped from the image as loaded (the project's path
since issue 13) beside the old path (cropped from the model's resized centre crop) and two
batched alternatives that were considered for the crops.

    OMP_NUM_THREADS=1 python benchmarks/views_cpu.py [--images 8] [--repeats 3]

Paths, for 63 random RandomResizedCrop + flip views and view 0 = the model's input:

- ``old``: the boxes of the resized centre crop, resampled in one ``grid_sample`` call (bilinear,
  no antialiasing), as ``make_views`` did before;
- ``new``: :func:`tta.augment.make_views`: the boxes of the image as loaded, each resized with
  torch's antialiased bilinear interpolation (torchvision's ``resized_crop``), flips batched;
- ``roi_align``: all boxes in one ``torchvision.ops.roi_align`` call with adaptive sampling (a box
  filter: not torchvision's filter, max error reported);
- ``dense``: all boxes in one pair of batched products with the exact resize weights.

Sizes: an ImageNet photo (500 x 375 -> 224 px) and the offline world (its 64 px render, and a
128 px render -> 64 px). One CPU thread; ms per image (all 64 views), median over the repeats.
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from timing import median_ms
from torchvision.ops import roi_align

from tta.augment import make_views
from tta.augment.views import crop_boxes

N_VIEWS = 64


def old_views(image: torch.Tensor, seed: int) -> torch.Tensor:
    """The old path: RandomResizedCrop boxes of the resized image, one grid_sample call."""
    _, height, width = image.shape
    boxes, flip = crop_boxes(torch.Generator().manual_seed(seed), N_VIEWS - 1, height, width)
    x0, y0, w, h = boxes.unbind(1)
    theta = torch.zeros(N_VIEWS - 1, 2, 3)
    theta[:, 0, 0] = torch.where(flip, -1.0, 1.0) * w / width
    theta[:, 0, 2] = (2 * x0 + w) / width - 1
    theta[:, 1, 1] = h / height
    theta[:, 1, 2] = (2 * y0 + h) / height - 1
    source = image.unsqueeze(0).expand(N_VIEWS - 1, -1, -1, -1)
    grid = F.affine_grid(theta, list(source.shape), align_corners=False)
    views = F.grid_sample(source, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return torch.cat([image.unsqueeze(0), views])


def roi_align_views(original: torch.Tensor, size: int, seed: int) -> torch.Tensor:
    pixels = original.float() / 255
    boxes, flip = crop_boxes(torch.Generator().manual_seed(seed), N_VIEWS - 1, *pixels.shape[1:])
    rois = torch.cat([torch.zeros(len(boxes), 1), boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], dim=1)
    views = roi_align(pixels[None], rois, (size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    return torch.where(flip.view(-1, 1, 1, 1), views.flip(-1), views)


def _weights(start: torch.Tensor, length: torch.Tensor, full: int, out: int) -> torch.Tensor:
    start, length = start.view(-1, 1, 1), length.view(-1, 1, 1)
    step = length / out
    centre = step * (torch.arange(out).view(1, -1, 1) + 0.5)
    local = torch.arange(full).view(1, 1, -1) - start
    weights = (1 - ((local + 0.5 - centre) / step.clamp(min=1)).abs()).clamp(min=0) * ((local >= 0) & (local < length))
    return weights / weights.sum(-1, keepdim=True)


def dense_views(original: torch.Tensor, size: int, seed: int) -> torch.Tensor:
    pixels = original.float() / 255
    channels, height, width = pixels.shape
    boxes, flip = crop_boxes(torch.Generator().manual_seed(seed), N_VIEWS - 1, height, width)
    rows, cols = _weights(boxes[:, 1], boxes[:, 3], height, size), _weights(boxes[:, 0], boxes[:, 2], width, size)
    first = (rows.reshape(-1, height) @ pixels.permute(1, 0, 2).reshape(height, -1)).view(len(boxes), -1, width)
    views = torch.bmm(first, cols.transpose(1, 2)).view(len(boxes), size, channels, size).permute(0, 2, 1, 3)
    return torch.where(flip.view(-1, 1, 1, 1), views.flip(-1), views)


def table_row(height: int, width: int, size: int, n_images: int, repeats: int, g: torch.Generator) -> str:
    originals = [
        TF.gaussian_blur((torch.rand(3, height, width, generator=g) * 255).to(torch.uint8), [5, 5], [1.5, 1.5])
        for _ in range(n_images)
    ]
    images = torch.stack([TF.center_crop(TF.resize(o, size, antialias=True), size).float() / 255 for o in originals])
    seeds = list(range(n_images))
    per_image = {
        "old": median_ms(lambda: [old_views(im, s) for im, s in zip(images, seeds)], repeats),
        "new": median_ms(lambda: make_views(originals, images, N_VIEWS, seeds), repeats),
        "roi": median_ms(lambda: [roi_align_views(o, size, s) for o, s in zip(originals, seeds)], repeats),
        "dense": median_ms(lambda: [dense_views(o, size, s) for o, s in zip(originals, seeds)], repeats),
    }
    exact = make_views(originals[:1], images[:1], N_VIEWS, seeds[:1])[0, 1:]
    error = (roi_align_views(originals[0], size, seeds[0]) - exact).abs().max().item()
    assert math.isfinite(error) and (dense_views(originals[0], size, seeds[0]) - exact).abs().max() < 1e-4
    cells = " | ".join(f"{ms / n_images:.1f}" for ms in per_image.values())
    return f"| {width} x {height} -> {size} | {cells} | {error:.3f} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    print(f"{N_VIEWS} views per image, {torch.get_num_threads()} CPU thread(s), median of {args.repeats} runs")
    print(
        "| image as loaded -> model input | old (from the centre crop) | new (from the image as loaded) | "
        "roi_align, one call | dense products, one call | roi_align max error vs torchvision |"
    )
    print("|---|---|---|---|---|---|")
    for (height, width), size in (((375, 500), 224), ((64, 64), 64), ((128, 128), 64)):
        print(table_row(height, width, size, args.images, args.repeats, g))


if __name__ == "__main__":
    main()
