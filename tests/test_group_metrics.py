"""Group metrics on hand-made score matrices (rows images, columns captions): strict maxima,
ties as failures, the 2 x 2 margin rule against the k! search, and the torchmetrics classes."""

from __future__ import annotations

import itertools

import pytest
import torch

from tta.metrics import (
    GroupMatch,
    GroupScore,
    ImageScore,
    MultipleChoiceAccuracy,
    TextScore,
    best_matching,
    group_match,
    group_match_margin,
    group_score,
    image_score,
    multiple_choice_accuracy,
    text_score,
)
from tta.metrics.groups import multiple_choice_correct


def brute_force(scores: torch.Tensor) -> tuple[bool, float]:
    """(ground truth strictly best of all k! matchings, best total - second best total) by enumeration."""
    k = scores.shape[-1]
    totals = {p: sum(float(scores[i, p[i]]) for i in range(k)) for p in itertools.permutations(range(k))}
    identity = totals.pop(tuple(range(k)))
    ordered = sorted([identity, *totals.values()], reverse=True)
    return identity > max(totals.values()), ordered[0] - ordered[1]


# (matrix, text, image, group, match): rows images, columns captions
CASES = [
    ([[2.0, 0.0], [0.0, 2.0]], 1, 1, 1, 1),
    ([[1.0, 0.5], [0.9, 0.8]], 0, 1, 0, 1),  # image 1 prefers caption 0; columns are fine
    ([[1.0, 0.9], [0.5, 0.8]], 1, 0, 0, 1),  # caption 1 prefers image 0
    ([[0.0, 1.0], [1.0, 0.0]], 0, 0, 0, 0),  # swapped
    ([[1.0, 1.0], [0.0, 2.0]], 0, 1, 0, 1),  # a tie in row 0 fails the text score
    ([[1.0, 0.0], [1.0, 2.0]], 1, 0, 0, 1),  # a tie in column 0 fails the image score
    ([[1.0, 0.5], [0.5, 0.0]], 0, 0, 0, 0),  # margin exactly 0: a tie, GroupMatch fails
    ([[float("nan"), 0.0], [0.0, 1.0]], 0, 0, 0, 0),
]


@pytest.mark.parametrize(("matrix", "text", "image", "group", "match"), CASES)
def test_hand_made_2x2(matrix, text, image, group, match):
    scores = torch.tensor(matrix)
    assert text_score(scores).tolist() == [bool(text)]
    assert image_score(scores).tolist() == [bool(image)]
    assert group_score(scores).tolist() == [bool(group)]
    assert group_match(scores).tolist() == [bool(match)]


def test_3x3_by_hand():
    # diagonal best in every row and column
    good = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [1.0, 0.0, 2.5]])
    # image 2 prefers caption 0 (column 0 still prefers image 0); the identity still wins the total
    row_fail = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [2.6, 0.0, 2.5]])
    # the matching 0->1, 1->0, 2->2 ties the identity: GroupMatch fails on the tie
    tie = torch.tensor([[1.0, 2.0, 0.0], [2.0, 3.0, 0.0], [0.0, 0.0, 1.0]])
    scores = torch.stack([good, row_fail, tie])
    assert text_score(scores).tolist() == [True, False, False]
    assert image_score(scores).tolist() == [True, True, False]
    assert group_match(scores).tolist() == [True, True, False]
    # best other matching of `good`: 0->0, 1->2, 2->1 (3 + 1 + 0) or 0->1, 1->0, 2->2 (1 + 0 + 2.5)
    assert group_match_margin(scores)[0].item() == pytest.approx(7.5 - 4.0)


@pytest.mark.parametrize("k", [2, 3, 4])
def test_group_match_equals_the_k_factorial_search(k):
    g = torch.Generator().manual_seed(k)
    # small integers: many ties among matchings
    scores = torch.randint(0, 4, (300, k, k), generator=g).float()
    expected = [brute_force(s)[0] for s in scores]
    assert group_match(scores).tolist() == expected
    assert 0 < sum(expected) < len(expected)
    _, gaps = best_matching(scores)
    assert gaps.tolist() == pytest.approx([brute_force(s)[1] for s in scores])


def test_2x2_margin_rule_is_the_search():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(-2, 3, (500, 2, 2), generator=g).float()
    margin = scores[:, 0, 0] + scores[:, 1, 1] - scores[:, 0, 1] - scores[:, 1, 0]
    assert torch.equal(group_match_margin(scores), margin)
    assert group_match(scores).tolist() == [brute_force(s)[0] for s in scores]
    _, gap = best_matching(scores)
    assert torch.equal(gap.float(), margin.abs())


def test_best_matching_finds_the_permutation():
    scores = torch.tensor([[0.0, 0.0, 5.0], [5.0, 0.0, 0.0], [0.0, 5.0, 0.0]])
    permutation, gap = best_matching(scores)
    assert permutation.tolist() == [[2, 0, 1]]
    assert gap.item() == pytest.approx(15 - 5)


def test_multiple_choice_strict_and_targets():
    scores = torch.tensor([[2.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 3.0, 1.0]])
    assert multiple_choice_correct(scores).tolist() == [True, False, False]
    assert multiple_choice_correct(scores, torch.tensor([0, 0, 1])).tolist() == [True, False, True]
    assert multiple_choice_accuracy(scores).item() == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="target"):
        multiple_choice_correct(scores, torch.tensor([0, 3, 0]))


def test_metric_classes_accumulate_like_the_functions():
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(7, 3, 3, generator=g) for _ in range(3)]
    everything = torch.cat(batches)
    for metric, fn in (
        (TextScore(), text_score),
        (ImageScore(), image_score),
        (GroupScore(), group_score),
        (GroupMatch(), group_match),
    ):
        for batch in batches:
            metric.update(batch)
        assert metric.compute().item() == pytest.approx(fn(everything).float().mean().item())
    choice = MultipleChoiceAccuracy()
    choice.update(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    choice.update(torch.tensor([[0.0, 1.0]]), target=torch.tensor([1]))
    assert choice.compute().item() == pytest.approx(2 / 3)


@pytest.mark.parametrize("shape", [(3,), (2, 3), (2, 2, 3), (1, 1)])
def test_bad_shapes_are_named(shape):
    with pytest.raises(ValueError, match="k x k"):
        group_score(torch.zeros(shape))


def test_scores_are_compared_in_their_own_precision():
    # float64 scores 1e-9 apart are not a tie (a float32 cast makes them one), as the reference compares them
    g = torch.Generator().manual_seed(0)
    base = torch.rand(2000, 2, 2, generator=g, dtype=torch.float64)
    scores = base.clone()
    scores[:, 0, 1] = scores[:, 0, 0] + torch.randint(-1, 2, (2000,), generator=g) * 1e-9
    scores[:, 1, 0] = scores[:, 1, 1] + torch.randint(-1, 2, (2000,), generator=g) * 1e-9
    reference_text = [(b[0, 0] > b[0, 1]).item() and (b[1, 1] > b[1, 0]).item() for b in scores]
    reference_image = [(b[0, 0] > b[1, 0]).item() and (b[1, 1] > b[0, 1]).item() for b in scores]
    assert text_score(scores).tolist() == reference_text
    assert image_score(scores).tolist() == reference_image
    choice = torch.tensor([[1.0 + 1e-9, 1.0], [1.0, 1.0 + 1e-9]], dtype=torch.float64)
    assert multiple_choice_correct(choice).tolist() == [True, False]
