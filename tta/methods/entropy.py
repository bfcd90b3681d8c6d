"""Entropy-based view selection and the marginal-entropy objective shared by view methods."""

from __future__ import annotations

import math

import torch


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of ``softmax(logits)`` over the last dimension, computed in log space."""
    logp = logits.float().log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


def n_confident(n_views: int, fraction: float) -> int:
    """How many views a method keeps: ``int(n_views * fraction)``, at least one (6 of 64 at 10%)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"selection fraction must be in (0, 1], got {fraction}")
    return max(1, int(n_views * fraction))


def select_confident(logits: torch.Tensor, fraction: float) -> torch.Tensor:
    """Indices (``B x k``) of each image's lowest-entropy views; ``logits`` is ``B x V x C``.

    The original view (index 0) is a candidate like any other. Ties keep the lower index.
    """
    k = n_confident(logits.shape[1], fraction)
    return entropy(logits).topk(k, dim=1, largest=False, sorted=True).indices


def gather_views(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[b, index[b]]`` for ``x`` of shape ``B x V x ...`` and ``index`` ``B x k``."""
    expanded = index.view(*index.shape, *([1] * (x.ndim - 2))).expand(-1, -1, *x.shape[2:])
    return x.gather(1, expanded)


def marginal_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the views' AVERAGED probability (``B x k x C`` -> ``B``), stably in log space.

    This is TPT's objective; it is not the mean of the per-view entropies.
    """
    logp = logits.float().log_softmax(-1)
    avg_logp = torch.logsumexp(logp, dim=1) - math.log(logits.shape[1])
    return -(avg_logp.exp() * avg_logp).sum(-1)
