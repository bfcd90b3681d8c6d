"""STS: spectrum-aware test-time steering (Dafnis & Metaxas, NeurIPS 2025).

Before test time: the class text embeddings Z (C x D) give a basis of their top-k right
singular vectors, k by the Gavish-Donoho optimal hard threshold for an unknown noise level.
Per image: a coefficient vector gamma (k, init 0) shared by all classes shifts every prototype
to ``normalize(z_c + gamma @ basis)`` (the basis rows orthonormal: not scaled by the singular
values); one AdamW step at lr 5e-3 minimises the entropy of the kept views' averaged prediction
plus ``lam * ||gamma @ basis||`` (or its square); the prediction is the kept views' averaged
probability under the steered prototypes. One fresh AdamW step moves each coefficient by about
lr, so the prototypes move little (a norm of about 0.02 for k = 12): most of the gain over the
original view's zero-shot prediction comes from averaging the confident views. No encoder is run or
differentiated: only the already computed view features and Z are used, so the cost is a few
small matrix products per image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tta.methods.entropy import gather_views, marginal_entropy, select_confident
from tta.methods.tpt import Adapted, LogitFn

FINAL_RULES = ("original", "kept_average")


def gavish_donoho_omega(beta: float) -> float:
    """Gavish & Donoho (2014) threshold coefficient for an unknown noise level (their cubic fit)."""
    return 0.56 * beta**3 - 0.95 * beta**2 + 1.82 * beta + 1.43


def spectral_basis(class_features: torch.Tensor, center: bool = False) -> torch.Tensor:
    """``k x D`` orthonormal rows spanning the significant spectrum of ``class_features``.

    k counts singular values above ``omega(beta) * median(singular values)`` with
    ``beta = min(C, D) / max(C, D)``; at least 1. ``center`` subtracts the mean prototype first.
    """
    z = class_features.float()
    if center:
        z = z - z.mean(0, keepdim=True)
    _, singular, vh = torch.linalg.svd(z, full_matrices=False)
    beta = min(z.shape) / max(z.shape)
    threshold = gavish_donoho_omega(beta) * singular.median()
    k = max(1, int((singular > threshold).sum()))
    return vh[:k]


def steered_prototypes(class_features: torch.Tensor, basis: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """``B x C x D``: each image's prototypes ``normalize(z_c + gamma_b @ basis)``."""
    shift = gamma @ basis  # B x D
    return F.normalize(class_features.unsqueeze(0) + shift.unsqueeze(1), dim=-1)


def sts_adapt(
    view_features: torch.Tensor,
    class_features: torch.Tensor,
    basis: torch.Tensor,
    logit_fn: LogitFn,
    lr: float = 5e-3,
    steps: int = 1,
    selection: float = 0.1,
    lam: float = 1.0,
    squared_norm: bool = False,
    final: str = "kept_average",
    weight_decay: float = 0.01,
) -> Adapted:
    """Steer each image's prototypes (the adapted variables are the ``B x k`` coefficients).

    ``final="kept_average"`` (the paper's prediction, as the sources we could read state it) returns
    the log of the kept views' averaged probabilities, with the steered prototypes;
    ``"original"`` predicts on view 0 (the TPT/TPS rule). With one step from gamma = 0 the penalty's
    gradient is zero, so ``lam`` only matters for ``steps > 1``.
    """
    if final not in FINAL_RULES:
        raise ValueError(f"final must be one of {FINAL_RULES}, got {final!r}")
    view_features, class_features = view_features.float(), class_features.float()
    b = view_features.shape[0]
    with torch.no_grad():
        selected = select_confident(logit_fn(view_features, class_features), selection)
    kept = gather_views(view_features, selected)
    gamma = torch.zeros(b, basis.shape[0], device=view_features.device, requires_grad=True)
    optimizer = torch.optim.AdamW([gamma], lr=lr, weight_decay=weight_decay)
    for _ in range(steps):
        shift = gamma @ basis
        penalty = shift.pow(2).sum(-1) if squared_norm else torch.linalg.vector_norm(shift, dim=-1)
        loss = (
            marginal_entropy(logit_fn(kept, steered_prototypes(class_features, basis, gamma))) + lam * penalty
        ).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        prototypes = steered_prototypes(class_features, basis, gamma)
        if final == "original":
            return Adapted(logit_fn(view_features[:, :1], prototypes)[:, 0], selected, gamma.detach())
        probs = logit_fn(kept, prototypes).softmax(-1).mean(1)
        return Adapted(probs.clamp_min(1e-12).log(), selected, gamma.detach())
