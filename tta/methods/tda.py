"""TDA: a training-free dynamic adapter of cached test features (Karmanov et al., CVPR 2024).

Online, no backward pass. Each test sample's feature is cached under its pseudo-label in a
positive cache (a few shots a class, the most confident ones) and, when its prediction is neither
confident nor hopeless, in a negative cache; every prediction adds the positive cache's affinity
logits to the zero-shot logits and subtracts the negative cache's. As the reference
(kdiAAA/TDA e697fb0) computes it, per sample, in ``tda_runner.py`` ``run_test_tda``:

1. ``utils.py`` ``get_clip_logits`` summarises the sample (:func:`summarise_views`). One view (the
   original: ImageNet itself and the ten fine-grained sets, whose loaders give the CLIP centre
   crop alone): its feature, its logits ``100 * f @ W``, the entropy of its softmax (the "loss"),
   its probabilities and its arg-max. Several views (ImageNet-A/-V2/-R/-Sketch: the original and
   63 AugMix views): the ``int(0.1 * V)`` views (6 of 64) with the lowest softmax entropy, the
   original a candidate like any other; the sample's feature is the MEAN of their features, not
   normalised again (it is the cache key and the query of the cache logits alike), its logits the
   mean of their logits, its loss the entropy of their averaged probabilities (``avg_entropy``),
   its probability map the mean of their probabilities, its pseudo-label the arg-max of the mean
   logits.
2. The normalised entropy is ``loss / log2(C)`` (``get_entropy``), although the loss is a
   natural-log entropy: it lies in ``[0, ln 2]``, not ``[0, 1]``, so the window 0.2-0.5 is
   0.29-0.72 of the maximum entropy. ``entropy_norm="log2"`` keeps that (the default);
   ``"ln"`` divides by ``ln C``, which puts the normalised entropy in ``[0, 1]``.
3. The caches are updated with the sample BEFORE its logits are computed (so a sample that enters
   the positive cache meets itself there, ``+alpha`` on its pseudo-label): the positive cache with
   ``(feature, loss)`` under the pseudo-label; the negative cache with ``(feature, loss, prob map)``
   under the same pseudo-label, only when ``lower < normalised entropy < upper`` (strict).
4. ``update_cache``: a class's entries are kept sorted by loss (Python's stable ``sorted``: equal
   losses keep their arrival order). A class with room appends; a full class replaces its last
   (highest-loss) entry only when the new loss is strictly lower; the list is then sorted again
   (:meth:`ClassCache.add`). A class's first entry always enters.
5. ``compute_cache_logits``: ``alpha * exp(-beta * (1 - q . k)) @ values`` over every cached key
   ``k`` (classes in ascending order, each class's entries in cache order), with ``q`` the sample's
   feature. Positive values are the entries' one-hot pseudo-labels; negative values the mask
   ``mask_lower < p < mask_upper`` (strict) of each entry's probability map. The final logits are
   ``logits + positive - negative``, each cache's term only once that cache holds an entry.
6. Precision: the reference loads CLIP with ``clip.load`` on CUDA, i.e. fp16 weights, so its whole
   loop runs in float16, and ``compute_cache_logits`` casts its values to half to match the fp16
   features. Here the summary and the final sum run in float32 on the view features as they
   arrive (rounded to fp16 under ``16-mixed``); the cache logits keep the reference's float16
   (affinity, kernel, product with the values and the ``alpha`` scaling in half, the product
   accumulated in float32 as a CUDA half GEMM does) under ``cache_dtype="float16"`` (the
   default); ``"float32"`` computes them in float32 (what the reference's code cannot do: its
   half values would not multiply fp32 features).
7. The logit scale: the reference hard-codes ``100.``; the state takes the model's
   ``logit_scale``, which is 100 for CLIP ViT-B/16. The class features are the model's template
   ensemble (``clip_classifier``: per-template features normalised, averaged, normalised again),
   as ``VisionLanguageModel.class_text_features`` computes them.
8. Views: the reference's AugMix (``datasets/utils.py`` ``augmix`` and ``AugMixAugmenter``,
   ``datasets/augmix_ops.py`` ``augmentations``: 9 operations at severity 1, 3 chains of 1-3,
   Dirichlet(1, 1, 1) chain weights, a Beta(1, 1) mix with the view, each view a RandomResizedCrop
   + flip of the image as loaded, view 0 the resized centre crop) is TPT's, which the callbacks'
   ``views="augmix"`` (``tta.augment``) re-implements on tensors from per-sample generators. With
   ``2 <= V < 10`` views the reference would average none (NaN): the callback refuses them.

The reference's configurations (``configs/*.yaml``) differ per data set only in the positive
cache's ``alpha`` and ``beta``: 3 positive shots, 2 negative shots, negative ``alpha`` 0.117 and
``beta`` 1, entropy window (0.2, 0.5), mask window (0.03, 1.0) everywhere.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from tta.methods.entropy import entropy, marginal_entropy, select_confident
from tta.methods.online import OnlineMethod

#: The fraction of views kept by lowest entropy when a sample has several (``get_clip_logits``).
CONFIDENT_FRACTION = 0.1
#: What the normalised entropy divides the (natural-log) entropy by: log2 C (the reference) or ln C.
ENTROPY_NORMS = ("log2", "ln")
#: The dtype of the cache logits: float16 (the reference's fp16 CLIP and half values) or float32.
CACHE_DTYPES = {"float16": torch.float16, "float32": torch.float32}


class ViewSummary(NamedTuple):
    """One sample as ``get_clip_logits`` returns it: the feature that is cached and queries the
    caches (``D``), the zero-shot logits (``C``), the loss (entropy, a 0-d tensor), the
    probability map (``C``) and the pseudo-label."""

    feature: torch.Tensor
    logits: torch.Tensor
    loss: torch.Tensor
    prob_map: torch.Tensor
    pred: int


def summarise_views(features: torch.Tensor, text: torch.Tensor, logit_scale: float) -> ViewSummary:
    """``get_clip_logits`` on one sample's ``V x D`` normalised view features (view 0 the original)
    against the ``C x D`` class features: the view itself when ``V == 1``, else the mean of the
    ``int(0.1 * V)`` lowest-entropy views (see the module doc)."""
    logits = logit_scale * features @ text.T
    if len(features) == 1:
        return ViewSummary(features[0], logits[0], entropy(logits[0]), logits[0].softmax(-1), int(logits[0].argmax()))
    kept = select_confident(logits[None], CONFIDENT_FRACTION)[0]
    confident = logits[kept]
    mean_logits = confident.mean(0)
    return ViewSummary(
        features[kept].mean(0),  # not normalised again, as the reference
        mean_logits,
        marginal_entropy(confident[None])[0],
        confident.softmax(-1).mean(0),
        int(mean_logits.argmax()),
    )


def normalised_entropy(loss: torch.Tensor, n_classes: int, norm: str = "log2") -> float:
    """``get_entropy``: the loss over ``log2(C)`` (the reference, although the loss is in nats) or ``ln C``."""
    if norm not in ENTROPY_NORMS:
        raise ValueError(f"entropy_norm must be one of {ENTROPY_NORMS}, got {norm!r}")
    return float(loss) / (math.log2(n_classes) if norm == "log2" else math.log(n_classes))


class ClassCache:
    """A per-class cache of test features: ``capacity`` slots a class, each holding a feature
    (``D``), its loss and, for a negative cache, its probability map (``C``).

    Slots ``0 .. count[c] - 1`` of class ``c`` hold its entries in the reference's list order
    (:meth:`add`: sorted by loss); the tensors are the state (``features`` ``C x K x D``, ``loss``
    ``C x K``, ``count`` ``C``, ``prob_map`` ``C x K x C`` or ``None``).
    """

    def __init__(
        self,
        n_classes: int,
        capacity: int,
        dim: int,
        prob_maps: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"a cache holds at least one entry a class, got capacity {capacity}")
        self.capacity = capacity
        self.features = torch.zeros(n_classes, capacity, dim, device=device)
        self.loss = torch.full((n_classes, capacity), math.inf, device=device)
        self.count = torch.zeros(n_classes, dtype=torch.int64, device=device)
        self.prob_map = torch.zeros(n_classes, capacity, n_classes, device=device) if prob_maps else None

    def add(self, label: int, feature: torch.Tensor, loss: torch.Tensor, prob_map: torch.Tensor | None = None) -> None:
        """``update_cache``: append while the class has room, else replace its highest-loss entry when
        ``loss`` is strictly lower; keep the class sorted by loss, equal losses in arrival order."""
        n = int(self.count[label])
        if n == self.capacity and not bool(loss < self.loss[label, n - 1]):
            return
        kept = min(n, self.capacity - 1)  # a full class loses its last entry
        # Python's stable sort puts the new entry after every kept entry with a loss <= its own
        position = int((self.loss[label, :kept] <= loss).sum())
        self._insert(label, position, kept, feature, loss, prob_map)

    def _insert(
        self,
        label: int,
        position: int,
        kept: int,
        feature: torch.Tensor,
        loss: torch.Tensor,
        prob_map: torch.Tensor | None,
    ) -> None:
        """Entries ``position .. kept - 1`` move one slot up; the new entry takes slot ``position``."""
        for table, value in ((self.features, feature), (self.loss, loss), (self.prob_map, prob_map)):
            if table is None:
                continue
            table[label, position + 1 : kept + 1] = table[label, position:kept].clone()
            table[label, position] = value
        self.count[label] = kept + 1

    def valid(self) -> torch.Tensor:
        """``C x K``: which slots hold an entry."""
        return torch.arange(self.capacity, device=self.count.device) < self.count[:, None]

    def size(self) -> int:
        return int(self.count.sum())

    def grown(self, capacity: int) -> ClassCache:
        """A copy with ``capacity`` slots a class (at least the present ones), entries unchanged."""
        n_classes, old, dim = self.features.shape
        copy = ClassCache(n_classes, capacity, dim, self.prob_map is not None, self.features.device)
        copy.features[:, :old] = self.features
        copy.loss[:, :old] = self.loss
        copy.count.copy_(self.count)
        if self.prob_map is not None:
            copy.prob_map[:, :old] = self.prob_map
        return copy

    def state_dict(self, prefix: str) -> dict[str, torch.Tensor]:
        state = {f"{prefix}features": self.features, f"{prefix}loss": self.loss, f"{prefix}count": self.count}
        if self.prob_map is not None:
            state[f"{prefix}prob_map"] = self.prob_map
        return {key: value.detach().clone().contiguous() for key, value in state.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor], prefix: str) -> None:
        for name in ("features", "loss", "count", "prob_map"):
            table = getattr(self, name)
            if table is not None:
                if state[prefix + name].shape != table.shape:
                    raise ValueError(
                        f"{prefix}{name} has shape {tuple(state[prefix + name].shape)}, the cache "
                        f"{tuple(table.shape)}: a state of another class list, dimension or capacity"
                    )
                table.copy_(state[prefix + name])


def cache_logits(
    query: torch.Tensor,
    cache: ClassCache,
    alpha: float,
    beta: float,
    mask: tuple[float, float] | None = None,
    dtype: torch.dtype = torch.float16,
) -> torch.Tensor:
    """``compute_cache_logits`` (``C``, float32): ``alpha * exp(-beta * (1 - query . key)) @ values``
    over the cached entries, in ``dtype``. Values: the entries' one-hot labels (positive cache), or
    with ``mask = (lower, upper)`` each entry's probability map thresholded (negative cache)."""
    valid = cache.valid()
    keys = cache.features[valid].to(dtype)  # N x D, classes ascending, each class in cache order
    affinity = keys @ query.to(dtype)
    kernel = ((-1) * (beta - beta * affinity)).exp()
    n_classes = len(cache.count)
    if mask is None:
        labels = torch.arange(n_classes, device=valid.device)[:, None].expand_as(valid)[valid]
        # the product with one-hot values: a float32 sum per class, rounded once, as a half GEMM
        summed = torch.zeros(n_classes, device=kernel.device).index_add_(0, labels, kernel.float()).to(dtype)
    else:
        probs = cache.prob_map[valid]
        values = ((probs > mask[0]) & (probs < mask[1])).to(dtype)
        summed = (kernel.float() @ values.float()).to(dtype)
    return (alpha * summed).float()


class TDAState(OnlineMethod):
    """TDA's positive and negative caches over one stream (see the module doc).

    Args:
        text_features: ``C x D`` normalised class features.
        logit_scale: the model's (100 for CLIP; the reference hard-codes 100).
        pos_enabled, pos_shot_capacity, pos_alpha, pos_beta: the positive cache (``configs/*.yaml``
            ``positive``).
        neg_enabled, neg_shot_capacity, neg_alpha, neg_beta: the negative cache.
        neg_entropy_lower, neg_entropy_upper: the normalised-entropy window (strict) of samples the
            negative cache takes.
        neg_mask_lower, neg_mask_upper: the probability window (strict) of a negative entry's classes.
        entropy_norm: ``"log2"`` (the reference) or ``"ln"``: what the entropy is divided by.
        cache_dtype: ``"float16"`` (the reference) or ``"float32"``: the dtype of the cache logits.
    """

    def __init__(
        self,
        text_features: torch.Tensor,
        logit_scale: float,
        pos_enabled: bool = True,
        pos_shot_capacity: int = 3,
        pos_alpha: float = 2.0,
        pos_beta: float = 5.0,
        neg_enabled: bool = True,
        neg_shot_capacity: int = 2,
        neg_alpha: float = 0.117,
        neg_beta: float = 1.0,
        neg_entropy_lower: float = 0.2,
        neg_entropy_upper: float = 0.5,
        neg_mask_lower: float = 0.03,
        neg_mask_upper: float = 1.0,
        entropy_norm: str = "log2",
        cache_dtype: str = "float16",
    ) -> None:
        if entropy_norm not in ENTROPY_NORMS:
            raise ValueError(f"entropy_norm must be one of {ENTROPY_NORMS}, got {entropy_norm!r}")
        if cache_dtype not in CACHE_DTYPES:
            raise ValueError(f"cache_dtype must be one of {tuple(CACHE_DTYPES)}, got {cache_dtype!r}")
        self.text = text_features.float()
        self.logit_scale = float(logit_scale)
        self.pos_enabled, self.pos_alpha, self.pos_beta = pos_enabled, pos_alpha, pos_beta
        self.neg_enabled, self.neg_alpha, self.neg_beta = neg_enabled, neg_alpha, neg_beta
        self.entropy_window = (neg_entropy_lower, neg_entropy_upper)
        self.mask_window = (neg_mask_lower, neg_mask_upper)
        self.entropy_norm, self.cache_dtype = entropy_norm, CACHE_DTYPES[cache_dtype]
        n_classes, dim = self.text.shape
        device = self.text.device
        self.pos = ClassCache(n_classes, pos_shot_capacity, dim, device=device)
        self.neg = self.negative_cache(n_classes, neg_shot_capacity, dim, device)

    def negative_cache(self, n_classes: int, capacity: int, dim: int, device: torch.device) -> ClassCache:
        """The negative cache (TDA's: sorted by loss, as the positive one)."""
        return ClassCache(n_classes, capacity, dim, prob_maps=True, device=device)

    def summarise(self, view_features: torch.Tensor) -> ViewSummary:
        """The sample's summary (``get_clip_logits``)."""
        return summarise_views(view_features, self.text, self.logit_scale)

    def update(self, summary: ViewSummary) -> None:
        """The caches' update with the sample (``run_test_tda``, before its logits)."""
        if self.pos_enabled:
            self.pos.add(summary.pred, summary.feature, summary.loss)
        lower, upper = self.entropy_window
        if self.neg_enabled and lower < normalised_entropy(summary.loss, len(self.text), self.entropy_norm) < upper:
            self.neg.add(summary.pred, summary.feature, summary.loss, summary.prob_map)

    def final_logits(self, summary: ViewSummary, positive: ClassCache) -> torch.Tensor:
        """The zero-shot logits plus ``positive``'s cache logits minus the negative cache's."""
        logits = summary.logits.clone()
        if self.pos_enabled and self.pos.size():
            logits += cache_logits(summary.feature, positive, self.pos_alpha, self.pos_beta, dtype=self.cache_dtype)
        if self.neg_enabled and self.neg.size():
            logits -= cache_logits(
                summary.feature, self.neg, self.neg_alpha, self.neg_beta, self.mask_window, self.cache_dtype
            )
        return logits

    def step(self, view_features: torch.Tensor) -> torch.Tensor:
        summary = self.summarise(view_features.float())
        self.update(summary)
        return self.final_logits(summary, self.pos)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**self.pos.state_dict("pos."), **self.neg.state_dict("neg.")}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        state = {key: value.to(self.text.device) for key, value in state.items()}
        self.pos.load_state_dict(state, "pos.")
        self.neg.load_state_dict(state, "neg.")

    def size(self) -> int:
        return self.pos.size() + self.neg.size()
