"""MTA: MeanShift for test-time augmentation (Zanella & Ben Ayed, CVPR 2024).

Per image, no backward pass: the mode of the V view embeddings (the original and V - 1 random
resized crops with flips, on every data set: the reference's ``--mta`` runs without AugMix) is
found by a MeanShift whose points are weighted by inlierness scores ``y``; the prediction is the
mode's logits. As the reference's ``mta.py`` computes it:

- bandwidth, one per view: ``sqrt(0.5 * mean of the squared distances to its k nearest other
  views)``, ``k = int(0.3 * (V - 1))`` (18 of 63); the kernel of view ``i`` around the mode ``m``
  is ``exp(-||x_i - m||^2 / (2 h_i^2))``;
- affinity ``A = softmax(logits) @ softmax(logits).T`` over the views' logits (``scale * cos``);
- ``y`` starts uniform (``1 / V``), the mode at the ORIGINAL view's embedding (not the mean);
- 5 outer iterations, each: the kernel at the current mode, then up to 5 inlierness steps
  ``y = softmax((kernel + lambda_q * A @ y) / lambda_y)``, then up to 5 mode steps
  ``m = normalize(sum_i kernel_i(m) y_i x_i / sum_i kernel_i(m) y_i)``; an inner loop stops
  early once its update moves less than 1e-6 (L2), per image; ``y`` carries over between
  outer iterations.

Defaults ``lambda_y = 0.2``, ``lambda_q = 4``. Images are processed together, each image's inner
loops stopping on its own test, so the result equals the reference's one image at a time.
The reference encodes the views under CUDA fp16 autocast; its normalisation ``x / x.norm()``
gives float32 features (autocast runs ``norm`` in float32), so its MeanShift runs in float32 on
fp16 projections. Here the math runs in float32 too, on the view features as the callbacks keep
them: normalised, then rounded to the autocast dtype (a difference of that rounding only).
"""

from __future__ import annotations

import torch

#: The reference's fixed constants (``mta.py``): outer and inner iteration caps, stopping threshold.
MAX_ITER = 5
THRESHOLD = 1e-6


def mta_bandwidth(features: torch.Tensor, neighbour_fraction: float = 0.3) -> torch.Tensor:
    """Each view's kernel bandwidth (``B x V x D`` -> ``B x V``): ``sqrt(0.5 * mean squared distance to
    its int(fraction * (V - 1)) nearest other views)``; the view itself (distance 0) is left out."""
    k = int(neighbour_fraction * (features.shape[1] - 1))
    distances = torch.cdist(features, features).sort(dim=-1).values[..., 1 : k + 1]
    return (0.5 * (distances**2).mean(-1)).sqrt()


def gaussian_kernel(mode: torch.Tensor, bandwidth: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """``exp(-||x_i - m||^2 / (2 h_i^2))`` for each view ``i`` (``B x D``, ``B x V``, ``B x V x D`` -> ``B x V``)."""
    distance = (features - mode.unsqueeze(1)).norm(dim=-1)
    return torch.exp(-(distance**2) / (2 * bandwidth**2))


def mta_mode(
    features: torch.Tensor,
    logits: torch.Tensor,
    lambda_y: float = 0.2,
    lambda_q: float = 4.0,
    neighbour_fraction: float = 0.3,
    max_iter: int = MAX_ITER,
    threshold: float = THRESHOLD,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The mode (``B x D``, unit norm) and the final inlierness scores (``B x V``) of each image's view
    embeddings ``features`` (``B x V x D``, normalised, view 0 the original) given the views'
    logits (``B x V x C``)."""
    x = features.float()
    b, v, _ = x.shape
    bandwidth = mta_bandwidth(x, neighbour_fraction)
    probs = logits.float().softmax(-1)
    affinity = probs @ probs.transpose(1, 2)  # B x V x V
    y = torch.full((b, v), 1.0 / v, device=x.device)
    mode = x[:, 0]
    for _ in range(max_iter):
        density = gaussian_kernel(mode, bandwidth, x)
        active = torch.ones(b, dtype=torch.bool, device=x.device)
        for step in range(1, max_iter + 1):
            new_y = (1 / lambda_y * (density + lambda_q * (affinity @ y.unsqueeze(-1)).squeeze(-1))).softmax(-1)
            moved = (new_y - y).norm(dim=-1)
            y = torch.where(active.unsqueeze(-1), new_y, y)
            active &= ~(moved < threshold)
            if step >= max_iter or not active.any():
                break
        active = torch.ones(b, dtype=torch.bool, device=x.device)
        for step in range(1, max_iter + 1):
            weights = gaussian_kernel(mode, bandwidth, x) * y
            new_mode = (weights.unsqueeze(-1) * x).sum(1) / weights.sum(-1, keepdim=True)
            new_mode = new_mode / new_mode.norm(dim=-1, keepdim=True)
            moved = (new_mode - mode).norm(dim=-1)
            mode = torch.where(active.unsqueeze(-1), new_mode, mode)
            active &= ~(moved < threshold)
            if step >= max_iter or not active.any():
                break
    return mode, y
