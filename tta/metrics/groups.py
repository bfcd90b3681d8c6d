"""Group metrics for compositional benchmarks (Winoground-style k x k groups, 1 x k multiple choice).

Convention: a group's score matrix ``S`` is ``k x k`` with **rows = images, columns = captions**
(``S[i, j]`` = score of image ``i`` with caption ``j``); the ground truth pairs image ``i`` with
caption ``i``. Batched inputs are ``N x k x k``. Every comparison is strict: a tie is a failure
(the ground truth must be strictly best), and so is a NaN. Scores are compared in the precision
they arrive in (float64 scores 1e-9 apart are not a tie), as the reference compares them.

- text score: every image's own caption is the strict maximum of its row;
- image score: every caption's own image is the strict maximum of its column;
- group score: both (chance 1/6 for 2 x 2 with random scores);
- group match: the identity matching has a strictly higher total than each of the other
  ``k! - 1`` matchings (chance 1/k!); for 2 x 2 the margin rule ``s00 + s11 - s01 - s10 > 0``.
  Computed without enumerating ``k!`` matchings: every other matching drops at least one diagonal
  pair, so the best of them is the best assignment with one diagonal pair forbidden, found by
  ``scipy.optimize.linear_sum_assignment`` ``k`` times.
- multiple-choice accuracy (``N x k`` scores of one image against ``k`` captions): the correct
  option (index 0 unless ``target`` says otherwise) is the strict maximum.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torchmetrics import Metric


def check_score_matrices(scores: torch.Tensor) -> torch.Tensor:
    """``scores`` as ``N x k x k`` (a single ``k x k`` matrix gets a batch axis), or a clear error."""
    if scores.ndim == 2:
        scores = scores.unsqueeze(0)
    if scores.ndim != 3 or scores.shape[-1] != scores.shape[-2] or scores.shape[-1] < 2:
        raise ValueError(
            f"group scores must be k x k or N x k x k with k >= 2 (rows images, columns "
            f"captions), got shape {tuple(scores.shape)}"
        )
    return scores


def _comparable(scores: torch.Tensor) -> torch.Tensor:
    """Floating scores as they are (no cast: a cast to float32 turns near-ties into ties);
    integer scores as float64 (exact), so that ``-inf`` can mask entries."""
    return scores if scores.is_floating_point() else scores.double()


def _strict_diagonal_max(scores: torch.Tensor, dim: int) -> torch.Tensor:
    """Per group: the diagonal entry is strictly above every other entry of its row (dim=-1) or column (dim=-2)."""
    k = scores.shape[-1]
    eye = torch.eye(k, dtype=torch.bool, device=scores.device)
    diagonal = scores.diagonal(dim1=-2, dim2=-1)  # N x k
    others = scores.masked_fill(eye, float("-inf"))
    best_other = others.amax(dim=dim)  # N x k: row i (dim=-1) or column j (dim=-2)
    return (diagonal > best_other).all(-1)


def text_score(scores: torch.Tensor) -> torch.Tensor:
    """``N`` bool: each image's own caption strictly beats the other captions."""
    return _strict_diagonal_max(_comparable(check_score_matrices(scores)), dim=-1)


def image_score(scores: torch.Tensor) -> torch.Tensor:
    """``N`` bool: each caption's own image strictly beats the other images."""
    return _strict_diagonal_max(_comparable(check_score_matrices(scores)), dim=-2)


def group_score(scores: torch.Tensor) -> torch.Tensor:
    """``N`` bool: text score and image score both."""
    return text_score(scores) & image_score(scores)


def best_matching(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group the best one-to-one matching of images to captions and its lead.

    Returns ``(permutation, gap)``: ``N x k`` long (image ``i`` goes with caption
    ``permutation[i]``) and ``N`` float, the best total minus the best total of any other
    matching (0 for a tie, NaN where scores are NaN). For 2 x 2 the gap is ``|s00 + s11 - s01 - s10|``.
    """
    scores = check_score_matrices(scores)
    k = scores.shape[-1]
    values = scores.detach().double().cpu().numpy()
    permutations = np.empty((len(values), k), dtype=np.int64)
    gaps = np.empty(len(values))
    for n, matrix in enumerate(values):
        if np.isnan(matrix).any():
            permutations[n], gaps[n] = np.arange(k), np.nan
            continue
        rows, cols = linear_sum_assignment(matrix, maximize=True)
        permutations[n] = cols
        best = matrix[rows, cols].sum()
        runner_up = -np.inf
        for i in range(k):  # every other matching drops at least one pair of the best
            forbidden = matrix.copy()
            forbidden[i, cols[i]] = -np.inf
            r, c = linear_sum_assignment(forbidden, maximize=True)
            runner_up = max(runner_up, forbidden[r, c].sum())
        gaps[n] = best - runner_up
    return torch.from_numpy(permutations), torch.from_numpy(gaps).to(
        scores.dtype if scores.is_floating_point() else torch.float64
    )


def group_match_margin(scores: torch.Tensor) -> torch.Tensor:
    """``N``: total of the ground-truth matching minus the best total of any other matching
    (> 0 exactly when GroupMatch holds). For 2 x 2 it is ``s00 + s11 - s01 - s10``."""
    scores = check_score_matrices(scores)
    k = scores.shape[-1]
    if k == 2:
        return scores[:, 0, 0] + scores[:, 1, 1] - scores[:, 0, 1] - scores[:, 1, 0]
    permutation, gap = best_matching(scores)
    identity_total = scores.diagonal(dim1=-2, dim2=-1).sum(-1).to(gap.dtype)
    best_total = scores.gather(-1, permutation.unsqueeze(-1).to(scores.device)).squeeze(-1).sum(-1).to(gap.dtype)
    is_identity = (permutation == torch.arange(k)).all(-1).to(gap.device)
    return torch.where(is_identity, gap, identity_total - best_total)


def group_match(scores: torch.Tensor) -> torch.Tensor:
    """``N`` bool: the ground-truth matching strictly beats every other of the ``k!`` matchings."""
    return group_match_margin(scores) > 0


def check_choice_scores(scores: torch.Tensor, target: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    if scores.ndim == 1:
        scores = scores.unsqueeze(0)
    if scores.ndim != 2 or scores.shape[-1] < 2:
        raise ValueError(f"multiple-choice scores must be N x k with k >= 2 options, got shape {tuple(scores.shape)}")
    if target is None:
        target = torch.zeros(len(scores), dtype=torch.long, device=scores.device)
    if target.shape != scores.shape[:1] or ((target < 0) | (target >= scores.shape[1])).any():
        raise ValueError(
            f"target must hold one option index in 0..{scores.shape[1] - 1} per row of scores, got {target.tolist()}"
        )
    return scores, target


def multiple_choice_correct(scores: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
    """``N`` bool: the correct option (``target``, default 0) strictly beats every other option."""
    scores, target = check_choice_scores(scores, target)
    scores = _comparable(scores)
    correct = scores.gather(1, target.view(-1, 1)).squeeze(1)
    others = scores.scatter(1, target.view(-1, 1), float("-inf"))
    return correct > others.amax(1)


def multiple_choice_accuracy(scores: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
    """Fraction of rows whose correct option strictly beats the others."""
    return multiple_choice_correct(scores, target).float().mean()


class _FractionOfGroups(Metric):
    """Fraction of groups for which a per-group test holds, accumulated over ``update`` calls."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("passed", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0), dist_reduce_fx="sum")

    def _passes(self, scores: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def update(self, scores: torch.Tensor) -> None:
        passed = self._passes(scores)
        self.passed += int(passed.sum())
        self.total += passed.numel()

    def compute(self) -> torch.Tensor:
        return self.passed.float() / self.total.clamp(min=1)


class TextScore(_FractionOfGroups):
    """Fraction of ``k x k`` groups (rows images, columns captions) passing :func:`text_score`."""

    def _passes(self, scores: torch.Tensor) -> torch.Tensor:
        return text_score(scores)


class ImageScore(_FractionOfGroups):
    """Fraction of groups passing :func:`image_score`."""

    def _passes(self, scores: torch.Tensor) -> torch.Tensor:
        return image_score(scores)


class GroupScore(_FractionOfGroups):
    """Fraction of groups passing :func:`group_score`."""

    def _passes(self, scores: torch.Tensor) -> torch.Tensor:
        return group_score(scores)


class GroupMatch(_FractionOfGroups):
    """Fraction of groups passing :func:`group_match`."""

    def _passes(self, scores: torch.Tensor) -> torch.Tensor:
        return group_match(scores)


class MultipleChoiceAccuracy(_FractionOfGroups):
    """Fraction of ``1 x k`` items whose correct option strictly wins (``update(scores, target=None)``)."""

    def update(self, scores: torch.Tensor, target: torch.Tensor | None = None) -> None:
        passed = multiple_choice_correct(scores, target)
        self.passed += int(passed.sum())
        self.total += passed.numel()
