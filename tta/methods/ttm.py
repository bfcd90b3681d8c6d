"""TTM, test-time matching: self-training on the whole prediction set from confident matchings.

Each round ``t`` of ``rounds``:

1. score every group with the current model (logit units: scale and bias applied);
2. pseudo-label the groups whose best matching leads the runner-up by at least ``tau_t``
   (2 x 2: identity if ``m >= tau``, else swapped if ``m <= -tau``, ``m = s00 + s11 - s01 - s10``;
   k x k: the best of the k! matchings if it leads the second best by ``tau``; 1 x k: the top
   caption if it leads the second by ``tau``); ``tau_t`` falls linearly from ``tau_max`` to 0.
   As in the reference, the comparisons are ``>=`` (at ``tau = 0`` an exact tie is kept: a tied
   2 x 2 group takes the identity) and are made in the precision the scores arrive in;
3. fine-tune all parameters (logit scale and bias included) on the pseudo-labelled pairs with
   the model's own contrastive loss, symmetric InfoNCE (CLIP) or sigmoid (SigLIP: the model has a
   logit bias), a group's images and captions always in the same batch so that each pair's hard
   negatives are there; for 1 x k items only the (image, chosen caption) pairs, as the reference
   (``unchosen_negatives=True`` adds the unchosen options as extra negatives); AdamW (weight
   decay 0.05) whose state is kept across rounds, peak learning rate ``lr * lr_decay**t`` with a
   cosine decay to ``min_lr_ratio`` of it within the round. The logit scale is not clamped (the
   reference does not, and SigLIP's learned scale is above 100; open_clip's models declare no
   bound on it: the clamp to ``log 100`` belongs to open_clip's training loop, not the model).

Data without groups (one image set, one caption set) are matched as a whole by the Hungarian
algorithm, keeping the ``1 - tau_t / tau_max`` most confident fraction of pairs (by matched score).

Ground truth is never used: image ``i`` of a group goes with caption ``i`` only by the
convention that lets :class:`RoundLog` report how precise the pseudo-labels were. The model is
fine-tuned in eval mode (normalisation statistics frozen) on a deep copy: the given model is
never changed.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from tta.metrics.groups import best_matching, check_score_matrices, group_match_margin
from tta.models.vlm import VisionLanguageModel
from tta.validation import check_number

LOSSES = ("auto", "infonce", "sigmoid")


@dataclass(frozen=True)
class TTMSchedule:
    """The round schedule; defaults are the reference's (Winoground, SigLIP-B16)."""

    rounds: int = 10
    tau_max: float = 2.0
    epochs: int = 30
    groups_per_batch: int = 50
    lr: float = 1e-5
    lr_decay: float = 0.95
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.05

    def __post_init__(self) -> None:
        for name in ("rounds", "epochs", "groups_per_batch"):
            check_number(name, getattr(self, name), 1, integer=True)
        check_number("tau_max", self.tau_max, 0)  # a margin in logit units
        check_number("lr", self.lr, 0, low_open=True)
        check_number("lr_decay", self.lr_decay, 0, 1, low_open=True)
        check_number("min_lr_ratio", self.min_lr_ratio, 0, 1)
        check_number("weight_decay", self.weight_decay, 0)

    def tau(self, round_index: int) -> float:
        """Threshold of round ``round_index``: linear from ``tau_max`` (first round) to 0 (last)."""
        if self.rounds == 1:
            return 0.0
        return self.tau_max * (1 - round_index / (self.rounds - 1))

    def peak_lr(self, round_index: int) -> float:
        return self.lr * self.lr_decay**round_index

    def step_lr(self, round_index: int, step: int, steps: int) -> float:
        """Cosine decay from the round's peak to ``min_lr_ratio`` of it over the round's ``steps``."""
        peak = self.peak_lr(round_index)
        low = peak * self.min_lr_ratio
        return low + 0.5 * (peak - low) * (1 + math.cos(math.pi * step / max(1, steps - 1)))


def select_group_labels(scores: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Pseudo-labels of ``N x k x k`` groups (rows images, columns captions).

    Returns ``(keep, permutation)``: ``N`` bool, groups whose best matching leads every other by
    at least ``tau``, and ``N x k`` long, the caption of each image under it. 2 x 2 groups follow
    the reference exactly: the margin ``s00 + s11 - s01 - s10`` in the scores' own precision,
    identity if ``margin >= tau``, else swapped if ``margin <= -tau`` (a tie at ``tau = 0`` is
    kept as the identity). NaN scores are never kept.
    """
    scores = check_score_matrices(scores)
    if scores.shape[-1] == 2:
        margin = group_match_margin(scores).cpu()
        identity, swapped = margin >= tau, margin <= -tau
        permutation = torch.tensor([[0, 1], [1, 0]])[(swapped & ~identity).long()]
        return identity | swapped, permutation
    permutation, gap = best_matching(scores)
    return gap >= tau, permutation  # NaN gaps compare False


def select_choice_labels(scores: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Pseudo-labels of ``N x k`` multiple-choice scores (one image, ``k`` captions).

    Returns ``(keep, choice)``: items whose top caption leads the second by at least ``tau``
    (ties kept at ``tau = 0``, as the reference), compared in the scores' own precision, and the
    top caption's index.
    """
    if scores.ndim != 2 or scores.shape[1] < 2:
        raise ValueError(f"multiple-choice scores must be N x k with k >= 2, got shape {tuple(scores.shape)}")
    top2 = scores.detach().cpu().topk(2, dim=1)
    gap = top2.values[:, 0] - top2.values[:, 1]
    return gap >= tau, top2.indices[:, 0]


def hungarian_labels(scores: torch.Tensor, keep_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Pseudo-pairs of a set without groups: ``M x C`` scores (images x captions).

    The Hungarian algorithm matches images to captions one-to-one (maximum total score); the
    ``keep_fraction`` of matched pairs with the highest scores are kept. Returns ``(image index,
    caption index)`` of the kept pairs, most confident first.
    """
    if scores.ndim != 2:
        raise ValueError(f"scores must be M x C (images x captions), got shape {tuple(scores.shape)}")
    if not 0 <= keep_fraction <= 1:
        raise ValueError(f"keep_fraction must be in [0, 1], got {keep_fraction}")
    rows, cols = linear_sum_assignment(scores.detach().double().cpu().numpy(), maximize=True)
    rows, cols = torch.from_numpy(rows), torch.from_numpy(cols)
    matched = scores.detach().cpu()[rows, cols]
    order = matched.argsort(descending=True)[: round(keep_fraction * len(rows))]
    return rows[order], cols[order]


def contrastive_loss(logits: torch.Tensor, positives: torch.Tensor, kind: str) -> torch.Tensor:
    """The model's own contrastive loss on ``B x T`` logits (images x captions, logit units).

    ``positives`` (``B x T`` bool) marks each image's caption(s); columns without a positive are
    extra negatives (a multiple-choice item's wrong options). ``infonce``: symmetric cross-entropy
    (image -> caption over all columns, caption -> image over the columns that have an image);
    ``sigmoid``: SigLIP's pairwise loss, summed over pairs and divided by the number of images.
    """
    positives = positives.to(logits.dtype)
    if kind == "sigmoid":
        signs = 2 * positives - 1
        return -F.logsigmoid(signs * logits).sum() / len(logits)
    if kind != "infonce":
        raise ValueError(f"loss must be 'infonce' or 'sigmoid', got {kind!r}")
    image_to_text = F.cross_entropy(logits, positives / positives.sum(1, keepdim=True))
    has_image = positives.sum(0) > 0
    columns = positives[:, has_image].T
    text_to_image = F.cross_entropy(logits[:, has_image].T, columns / columns.sum(1, keepdim=True))
    return 0.5 * (image_to_text + text_to_image)


@dataclass
class RoundLog:
    """What one round did: threshold, learning rate, pseudo-labels, optimizer steps, wall time."""

    round: int
    tau: float
    peak_lr: float
    selected: int  # pseudo-labelled groups (pairs for data without groups)
    precision: float | None  # fraction of them that agree with the ground-truth convention
    steps: int
    loss: float | None  # mean training loss of the round
    seconds: float


@dataclass
class _Selection:
    """Pseudo-labelled training units: each unit's images, their captions and extra negatives."""

    images: list[torch.Tensor]  # per unit: n_i x 3 x H x W
    captions: list[list[str]]  # per unit: the pseudo caption of each image
    negatives: list[list[str]]  # per unit: extra negatives (1 x k with unchosen_negatives: the other options)
    correct: int


class TestTimeMatching:
    """Runs TTM on a deep copy of a :class:`VisionLanguageModel` (``self.vlm``, the adapted one).

    Args:
        vlm: the model to adapt; it is copied, never changed.
        schedule: rounds, thresholds, learning rates (:class:`TTMSchedule`).
        loss: ``"infonce"``, ``"sigmoid"`` or ``"auto"`` (sigmoid when the model has a logit bias).
        seed: order of the groups in the batches.
        encode_batch_size: images per tower call when scoring the set (speed and memory only).
        unchosen_negatives: for 1 x k items, add the options the pseudo-label did not choose as
            extra negatives of the contrastive loss (off: the reference trains on the (image,
            chosen caption) pairs only).
    """

    __test__ = False  # not a pytest test class despite the name

    def __init__(
        self,
        vlm: VisionLanguageModel,
        schedule: TTMSchedule = TTMSchedule(),
        loss: str = "auto",
        seed: int = 0,
        encode_batch_size: int = 256,
        unchosen_negatives: bool = False,
    ) -> None:
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        self.vlm = copy.deepcopy(vlm).eval()
        self.schedule, self.seed, self.encode_batch_size = schedule, int(seed), int(encode_batch_size)
        self.unchosen_negatives = bool(unchosen_negatives)
        self.loss = ("sigmoid" if vlm.logit_bias is not None else "infonce") if loss == "auto" else loss
        self.optimizer = torch.optim.AdamW(
            [p for p in self.vlm.parameters() if p.is_floating_point()],
            lr=schedule.lr,
            weight_decay=schedule.weight_decay,
        )
        self.rounds: list[RoundLog] = []

    @torch.no_grad()
    def score_groups(self, images: torch.Tensor, captions: Sequence[Sequence[str]]) -> torch.Tensor:
        """``N x m x k`` scores in logit units of ``N x m`` images against their group's ``k`` captions."""
        n, m = images.shape[:2]
        k = len(captions[0])
        image_features = self.vlm.encode_image(images.flatten(0, 1), batch_size=self.encode_batch_size)
        flat = [c for group in captions for c in group]
        text_features = torch.cat(
            [
                self.vlm.encode_text(self.vlm.tokenize(flat[i : i + self.encode_batch_size]))
                for i in range(0, len(flat), self.encode_batch_size)
            ]
        )
        return self.vlm.logits(image_features.view(n, m, -1), text_features.view(n, k, -1))

    def fit_groups(
        self,
        images: torch.Tensor,
        captions: Sequence[Sequence[str]],
        on_round: Callable[[RoundLog], None] | None = None,
    ) -> list[RoundLog]:
        """Run every round on ``N`` groups: ``N x k x 3 x H x W`` images with ``k`` captions each
        (k x k), or ``N x 1 x 3 x H x W`` images with ``k`` options each (1 x k multiple choice).
        ``on_round`` is called with each round's log as it ends (progress)."""
        images = self._check_groups(images, captions)

        def select(tau: float) -> _Selection:
            scores = self.score_groups(images, captions)
            if images.shape[1] == 1:
                keep, choice = select_choice_labels(scores[:, 0], tau)
                units = keep.nonzero().flatten().tolist()
                return _Selection(
                    [images[i] for i in units],
                    [[captions[i][int(choice[i])]] for i in units],
                    [
                        [c for j, c in enumerate(captions[i]) if j != int(choice[i])] if self.unchosen_negatives else []
                        for i in units
                    ],
                    int((choice[keep] == 0).sum()),
                )
            keep, permutation = select_group_labels(scores, tau)
            units = keep.nonzero().flatten().tolist()
            identity = torch.arange(images.shape[1])
            return _Selection(
                [images[i] for i in units],
                [[captions[i][j] for j in permutation[i].tolist()] for i in units],
                [[] for _ in units],
                int((permutation[keep] == identity).all(1).sum()),
            )

        return self._run(select, on_round)

    def fit_set(self, images: torch.Tensor, captions: Sequence[str]) -> list[RoundLog]:
        """Run every round on data without groups: ``M x 3 x H x W`` images and ``C`` captions,
        matched by the Hungarian algorithm (ground-truth convention: image ``i``, caption ``i``)."""
        if images.ndim != 4 or len(images) == 0 or len(captions) == 0:
            raise ValueError(
                f"fit_set needs M x 3 x H x W images and a non-empty caption list, got "
                f"{tuple(images.shape)} and {len(captions)} captions"
            )
        captions = [str(c) for c in captions]

        def select(tau: float) -> _Selection:
            scores = self.score_groups(images.unsqueeze(0), [captions])[0]
            fraction = 1.0 if self.schedule.tau_max == 0 else 1 - tau / self.schedule.tau_max
            rows, cols = hungarian_labels(scores, fraction)
            pairs = list(zip(rows.tolist(), cols.tolist()))
            return _Selection(
                [images[r : r + 1] for r, _ in pairs],
                [[captions[c]] for _, c in pairs],
                [[] for _ in pairs],
                int((rows == cols).sum()),
            )

        return self._run(select)

    def _run(self, select, on_round: Callable[[RoundLog], None] | None = None) -> list[RoundLog]:
        generator = torch.Generator().manual_seed(self.seed)
        self.vlm.requires_grad_(True)
        for t in range(self.schedule.rounds):
            start = time.perf_counter()
            tau = self.schedule.tau(t)
            selection = select(tau)
            n = len(selection.images)
            per_batch = self.schedule.groups_per_batch
            batches_per_epoch = math.ceil(n / per_batch)
            steps, losses = self.schedule.epochs * batches_per_epoch, []
            for epoch in range(self.schedule.epochs if n else 0):
                order = torch.randperm(n, generator=generator).tolist()
                for b in range(batches_per_epoch):
                    units = order[b * per_batch : (b + 1) * per_batch]
                    lr = self.schedule.step_lr(t, epoch * batches_per_epoch + b, steps)
                    losses.append(
                        self._step(
                            [selection.images[u] for u in units],
                            [selection.captions[u] for u in units],
                            [selection.negatives[u] for u in units],
                            lr,
                        )
                    )
            self.rounds.append(
                RoundLog(
                    round=t,
                    tau=tau,
                    peak_lr=self.schedule.peak_lr(t),
                    selected=n,
                    precision=selection.correct / n if n else None,
                    steps=steps if n else 0,
                    loss=sum(losses) / len(losses) if losses else None,
                    seconds=time.perf_counter() - start,
                )
            )
            if on_round is not None:
                on_round(self.rounds[-1])
        self.vlm.requires_grad_(False)
        return self.rounds

    def _step(
        self, images: list[torch.Tensor], captions: list[list[str]], negatives: list[list[str]], lr: float
    ) -> float:
        chosen = [c for unit in captions for c in unit]
        texts = list(dict.fromkeys(chosen + [c for unit in negatives for c in unit]))
        column = {c: j for j, c in enumerate(texts)}
        positives = torch.zeros(len(chosen), len(texts), dtype=torch.bool)
        positives[torch.arange(len(chosen)), torch.tensor([column[c] for c in chosen])] = True
        image_features = self.vlm.encode_image(torch.cat(images))
        text_features = self.vlm.encode_text(self.vlm.tokenize(texts))
        logits = self.vlm.logits(image_features, text_features)
        loss = contrastive_loss(logits, positives.to(logits.device), self.loss)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())

    @staticmethod
    def _check_groups(images: torch.Tensor, captions: Sequence[Sequence[str]]) -> torch.Tensor:
        if images.ndim != 5 or images.shape[2] != 3:
            raise ValueError(f"group images must be N x k x 3 x H x W, got shape {tuple(images.shape)}")
        if len(captions) != len(images) or not len(captions):
            raise ValueError(f"need one caption list per group: {len(images)} groups, {len(captions)} caption lists")
        sizes = {len(c) for c in captions}
        if len(sizes) != 1 or (images.shape[1] != 1 and sizes != {images.shape[1]}):
            raise ValueError(
                f"every group needs the same number of captions, equal to its images (k x k) or "
                f"one image with k captions (1 x k); got {images.shape[1]} images and caption "
                f"counts {sorted(sizes)}"
            )
        if sizes == {1}:
            raise ValueError("groups need k >= 2 captions: with one caption there is nothing to match")
        return images
