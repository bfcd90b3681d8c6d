"""The augmentation-only baseline: average the confident views' predictions, no tuning.

A part of any view-based method's gain comes from the views alone; this isolates it.
"""

from __future__ import annotations

import math

import torch

from tta.methods.entropy import gather_views, select_confident


def confident_view_average(view_logits: torch.Tensor, selection: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Log of the kept views' averaged probabilities (``B x V x C`` -> ``B x C``) and the kept indices."""
    selected = select_confident(view_logits, selection)
    logp = gather_views(view_logits.float(), selected).log_softmax(-1)
    return torch.logsumexp(logp, dim=1) - math.log(selected.shape[1]), selected
