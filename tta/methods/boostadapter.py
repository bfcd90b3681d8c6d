"""BoostAdapter: TDA's caches plus regional bootstrapping from the sample's own views (Zhang et al., NeurIPS 2024).

Online, no backward pass. BoostAdapter keeps TDA's historical caches (:mod:`tta.methods.tda`) and,
for each sample, adds "boosting" entries drawn from the sample's own augmented views to a copy of
the positive cache that serves this sample's prediction only. As the reference
(taolinzhang/BoostAdapter 9983e1a, ``runner.py`` ``run_test_tda`` with ``--mode boostadapter``)
computes it, per sample:

1. ``utils.py`` ``get_clip_logits``: on the fine-grained sets (``infer_ori_image``, decided by the
   data set's name: ``infer_original=True`` here) the summary is the ORIGINAL view's alone (its
   feature, logits, entropy, probabilities, arg-max) although the sample has 64 views; on
   ImageNet-A/-V2/-R/-Sketch it is TDA's mean of the 10% most confident views
   (:func:`tta.methods.tda.summarise_views`); ImageNet itself has one view.
2. The historical positive cache takes ``(feature, loss)`` under the pseudo-label (``update_cache``
   with ``fifo=False``: append, sort by loss, keep the ``shot_capacity`` lowest; with a class never
   above its capacity this is TDA's rule, :meth:`tta.methods.tda.ClassCache.add`).
3. Regional bootstrapping: the ``int(0.1 * V)`` views of lowest softmax entropy among ALL the
   sample's views, the original a candidate (``select_confident_samples``; on ImageNet-A/... the
   same views TDA's summary averaged), in order of increasing entropy, each join a DEEP COPY of
   the (already updated) positive cache under its own arg-max, with its own normalised feature and
   its own entropy as the loss (``get_output_entropy``), at a capacity of ``shot_capacity + delta``
   a class (append, sort, keep the lowest). The copy serves this sample's positive cache logits and
   is then dropped: boosting entries never enter the historical cache. With one view there is no
   boosting entry (``int(0.1 * 1) = 0``).
4. The negative cache (same entropy window as TDA's, same pseudo-label) is first in, first out:
   ``update_cache(..., include_prob_map=True)`` leaves ``fifo`` at its default ``True``, so a full
   class drops its OLDEST entry, whatever the losses (TDA keeps the lowest-loss ones).
5. The logits: the summary's logits plus the boosted copy's positive cache logits minus the
   negative cache's, ``compute_cache_logits`` as TDA's (fp16 values; ``cache_dtype``).

The entropy normalisation (``get_entropy``: nats over ``log2 C``), the cache logits' half precision
and the logit scale (``100.`` hard-coded, the model's here) are TDA's, with TDA's options.
Per data set the reference's ``configs/*.yaml`` set TDA's positive ``alpha`` and ``beta`` (the
values of TDA's own configurations) and ``delta`` (0-3; none for ImageNet, where no view is
bootstrapped).
"""

from __future__ import annotations

import torch

from tta.methods.entropy import entropy, select_confident
from tta.methods.tda import CONFIDENT_FRACTION, ClassCache, TDAState, ViewSummary, summarise_views


class FifoClassCache(ClassCache):
    """A :class:`~tta.methods.tda.ClassCache` whose full class drops its oldest entry
    (``update_cache`` with ``fifo=True``); entries in arrival order."""

    def add(self, label: int, feature: torch.Tensor, loss: torch.Tensor, prob_map: torch.Tensor | None = None) -> None:
        n = int(self.count[label])
        if n == self.capacity:
            for table in (self.features, self.loss, self.prob_map):
                if table is not None:
                    table[label, :-1] = table[label, 1:].clone()
            n -= 1
        self._insert(label, n, n, feature, loss, prob_map)


def boosted_cache(
    positive: ClassCache,
    view_features: torch.Tensor,
    text: torch.Tensor,
    logit_scale: float,
    delta: int,
) -> ClassCache:
    """A copy of the positive cache at ``delta`` more slots a class, with the sample's ``int(0.1 * V)``
    lowest-entropy views (``V x D``) added under their own arg-max, their entropy as the loss."""
    boosted = positive.grown(positive.capacity + delta)
    if len(view_features) == 1:  # int(0.1 * 1) = 0 views to bootstrap from
        return boosted
    logits = logit_scale * view_features @ text.T
    kept = select_confident(logits[None], CONFIDENT_FRACTION)[0]  # in order of increasing entropy
    for view, loss in zip(kept.tolist(), entropy(logits[kept])):
        boosted.add(int(logits[view].argmax()), view_features[view], loss)
    return boosted


class BoostAdapterState(TDAState):
    """BoostAdapter's historical caches over one stream (see the module doc).

    Args:
        text_features, logit_scale: as :class:`~tta.methods.tda.TDAState`.
        delta: the boosted copy's extra slots a class (``configs/*.yaml`` ``delta``).
        infer_original: summarise the sample by its original view alone (the reference's fine-grained
            sets) instead of TDA's mean of its confident views.
        **tda_options: :class:`~tta.methods.tda.TDAState`'s cache options.
    """

    def __init__(
        self,
        text_features: torch.Tensor,
        logit_scale: float,
        delta: int = 3,
        infer_original: bool = False,
        **tda_options,
    ) -> None:
        if delta < 0:
            raise ValueError(f"delta must be at least 0, got {delta}")
        self.delta, self.infer_original = delta, infer_original
        super().__init__(text_features, logit_scale, **tda_options)

    def negative_cache(self, n_classes: int, capacity: int, dim: int, device: torch.device) -> ClassCache:
        return FifoClassCache(n_classes, capacity, dim, prob_maps=True, device=device)

    def summarise(self, view_features: torch.Tensor) -> ViewSummary:
        if self.infer_original:
            return summarise_views(view_features[:1], self.text, self.logit_scale)
        return super().summarise(view_features)

    def step(self, view_features: torch.Tensor) -> torch.Tensor:
        views = view_features.float()
        summary = self.summarise(views)
        self.update(summary)
        if not self.pos_enabled:  # no positive cache logits, hence nothing to boost
            return self.final_logits(summary, self.pos)
        return self.final_logits(summary, boosted_cache(self.pos, views, self.text, self.logit_scale, self.delta))
