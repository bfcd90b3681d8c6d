"""LAME: Laplacian adjusted maximum-likelihood estimation (Boudiaf et al., CVPR 2022).

A frozen model's probabilities ``p`` (N x C) over one batch are adjusted so that points close
in feature space agree: the output ``z`` minimises

    E(z) = sum_i KL(z_i || p_i) - sum_ij w_ij z_i^T z_j

over the probability simplex, by the parallel fixed point
``z_i <- softmax(log(p_i + 1e-10) + sum_j w_ij z_j)`` from ``z = softmax(log(p + 1e-10))``, with the
reference code's unary term and stopping rule (:func:`fixed_point`). Nothing is learned and no
state is kept between batches: the batch is the neighbourhood, so the batch size is the method's
key setting.

Affinities ``W`` (N x N) on L2-normalised features with Euclidean distances:

- ``knn``: ``w_ij = 1`` for the ``k`` nearest neighbours ``j`` of ``i`` (itself excluded), else 0;
  not symmetrised;
- ``rbf``: ``w_ij = exp(-d_ij^2 / (2 sigma^2))``, dense, self-loops kept (``w_ii = 1``), with
  ``sigma`` the mean over points of the distance to their k-th nearest point, the point itself
  counting as the first;
- ``linear``: ``W = F F^T`` (cosine similarities).

``k`` is clamped to what the batch allows (N - 1 neighbours for ``knn``, N points for the rbf
``sigma``), so every affinity works on a batch of one. There the reference differs: with N = 1 its
rbf bandwidth is 0 and its answer NaN; here ``sigma`` is floored at the dtype's epsilon, so a
batch of one (or of identical points) keeps a finite answer (its own probabilities, up to the
1e-10 of the unary term).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from tta.validation import OptionError, check_number

#: Iterations between two host-side convergence checks of :func:`fixed_point` (see there).
CHECK_EVERY = 10
#: The reference's unary term is ``-log(p + UNARY_EPS)``: a class below 1e-10 is not ruled out.
UNARY_EPS = 1e-10
#: The reference's floor inside the entropy term of the bound, ``z log max(z, 1e-20)``.
ENTROPY_FLOOR = 1e-20


def squared_distances(features: torch.Tensor) -> torch.Tensor:
    """``N x N`` squared Euclidean distances between the L2-normalised rows of ``features``."""
    unit = F.normalize(features, dim=-1)
    squared = (2 - 2 * unit @ unit.T).clamp_min(0)
    # The Gram form leaves rounding error on the diagonal; a point's distance to itself is 0
    # exactly, which keeps rbf self-loops at exactly 1 and self first in every distance ranking.
    return squared.fill_diagonal_(0)


def knn_affinity(features: torch.Tensor, k: int = 5) -> torch.Tensor:
    """``w_ij = 1`` for the ``min(k, N - 1)`` nearest neighbours ``j != i`` of ``i`` (row i), else 0.

    Not symmetric: ``j`` can be among ``i``'s neighbours without ``i`` being among ``j``'s.
    With N = 1 there is no neighbour and ``W`` is zero.
    """
    n = features.shape[0]
    distances = squared_distances(features).fill_diagonal_(float("inf"))
    n_neighbours = min(k, n - 1)
    neighbours = distances.topk(n_neighbours, dim=1, largest=False).indices
    affinity = torch.zeros(n, n, dtype=features.dtype, device=features.device)
    return affinity.scatter_(1, neighbours, 1.0)


def rbf_sigma(features: torch.Tensor, k: int = 5) -> torch.Tensor:
    """The rbf bandwidth: mean over points of the distance to their ``min(k, N)``-th nearest point,
    the point itself counted as the first (so ``k = 1`` gives 0)."""
    distances = squared_distances(features).sqrt()
    kth = distances.topk(min(k, features.shape[0]), dim=1, largest=False).values[:, -1]
    return kth.mean()


def rbf_affinity(features: torch.Tensor, k: int = 5) -> torch.Tensor:
    """Dense ``exp(-d_ij^2 / (2 sigma^2))`` with ``sigma`` from :func:`rbf_sigma`; ``w_ii = 1``.

    ``sigma`` is floored at the dtype's epsilon so that a batch of one (or of identical points,
    where ``sigma = 0``) gives ``w = 1`` between coinciding points and 0 elsewhere, not NaN.
    """
    sigma = rbf_sigma(features, k).clamp_min(torch.finfo(features.dtype).eps)
    return torch.exp(-squared_distances(features) / (2 * sigma**2))


def linear_affinity(features: torch.Tensor) -> torch.Tensor:
    """``F F^T`` of the L2-normalised features: cosine similarities, self-loops 1."""
    unit = F.normalize(features, dim=-1)
    return unit @ unit.T


AFFINITIES: dict[str, Callable[[torch.Tensor, int], torch.Tensor]] = {
    "knn": knn_affinity,
    "rbf": rbf_affinity,
    "linear": lambda features, k: linear_affinity(features),
}


def check_lame_args(affinity: str, k: int, max_iter: int, tol: float) -> None:
    """Clear errors for settings LAME cannot run with."""
    if affinity not in AFFINITIES:
        raise OptionError("affinity", f"must be one of {sorted(AFFINITIES)}, got {affinity!r}")
    # k: neighbours for knn, the k-th nearest point for the rbf bandwidth (ignored by linear)
    check_number("k", k, 1, integer=True)
    check_number("max_iter", max_iter, 1, integer=True)  # the paper: 100
    check_number("tol", tol, 0)  # 0: always run max_iter iterations; the paper: 1e-8


def fixed_point(
    log_probs: torch.Tensor,
    affinity: torch.Tensor,
    max_iter: int = 100,
    tol: float = 1e-8,
    check_every: int = CHECK_EVERY,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimise the LAME objective by the parallel fixed point; returns ``(z, iterations)``.

    ``log_probs`` (N x C) is the unary term ``log(p + 1e-10)`` (see :data:`UNARY_EPS`), ``affinity``
    is W. As the reference: ``z_0 = softmax(log_probs)``; iteration t computes the pairwise term of
    the previous iterate ``a = W z_{t-1}``, then ``z_t = softmax(log_probs + a)`` and the bound

        E_t = sum_i z_t,i^T (log max(z_t,i, 1e-20) - log_probs_i - a_i)

    (with the previous iterate's pairwise term ``a``, as the reference computes it), and stops
    after iteration t >= 3 as soon as ``|E_t - E_{t-1}| <= tol * |E_{t-1}|`` (so when
    ``E_{t-1} = 0`` only an exact repeat stops it), or after ``max_iter`` iterations.
    ``iterations`` (a 0-d long tensor, on the device) counts the iterations applied.

    The stopping rule depends on the data, but reading it on the host costs a device sync
    (``.item()``) that stalls the GPU queue. So the test runs on the device every iteration and
    latches a ``converged`` flag; once set, later iterations are computed but not applied
    (``torch.where`` keeps ``z``), and the host reads the flag only every ``check_every``
    iterations to leave the loop. The result is identical to stopping at the first iteration
    that meets the rule, whatever ``check_every``; the price is at most ``check_every - 1``
    discarded iterations (each one ``N x N x C`` product) and one sync per ``check_every``.
    """
    if check_every < 1:
        raise ValueError(f"check_every must be >= 1 (iterations between host-side checks), got {check_every}")
    z = log_probs.softmax(-1)
    converged = torch.zeros((), dtype=torch.bool, device=z.device)
    iterations = torch.zeros((), dtype=torch.long, device=z.device)
    previous_energy = None
    for t in range(1, max_iter + 1):
        pairwise = affinity @ z
        z_new = torch.softmax(log_probs + pairwise, dim=-1)
        energy = (z_new * (z_new.clamp_min(ENTROPY_FLOOR).log() - log_probs - pairwise)).sum()
        z = torch.where(converged, z, z_new)
        iterations = iterations + (~converged).long()
        if t >= 3:
            converged = converged | ((energy - previous_energy).abs() <= tol * previous_energy.abs())
        previous_energy = energy if previous_energy is None else torch.where(converged, previous_energy, energy)
        if t % check_every == 0 and t < max_iter and bool(converged):
            break
    return z, iterations


def laplacian_adjust(
    probs: torch.Tensor,
    features: torch.Tensor,
    affinity: str = "rbf",
    k: int = 5,
    max_iter: int = 100,
    tol: float = 1e-8,
) -> torch.Tensor:
    """LAME's adjusted probabilities (N x C) of one batch.

    Args:
        probs: N x C probabilities of the frozen model (rows are renormalised to sum to 1; exact
            zeros are allowed: the unary term is ``log(p + 1e-10)``, as in the reference).
        features: N x D features of the same samples (L2-normalised here).
        affinity: "rbf" (the paper's default), "knn" or "linear" (see the module docstring).
        k: neighbours for knn; the k-th nearest point (itself counted) for the rbf bandwidth.
        max_iter, tol: the stopping rule of :func:`fixed_point`.

    Run it in float32 or wider and outside autograd. With ``knn`` and N = 1 there is no
    neighbour and the (normalised) input is returned as it is.
    """
    check_lame_args(affinity, k, max_iter, tol)
    if probs.ndim != 2 or features.ndim != 2 or probs.shape[0] != features.shape[0]:
        raise ValueError(
            f"need probs N x C and features N x D with the same N, got {tuple(probs.shape)} and {tuple(features.shape)}"
        )
    probs = probs / probs.sum(-1, keepdim=True)
    if affinity == "knn" and probs.shape[0] == 1:
        return probs
    weights = AFFINITIES[affinity](features.to(probs.dtype), k)
    log_probs = (probs + UNARY_EPS).log()
    adjusted, _ = fixed_point(log_probs, weights, max_iter=max_iter, tol=tol)
    return adjusted
