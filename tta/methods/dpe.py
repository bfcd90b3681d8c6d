"""DPE: dual prototype evolving, textual and visual, with per-sample residuals (Zhang et al., NeurIPS 2024).

Online, with one backward pass a sample. The state holds the stream's textual prototypes (the class
features, evolved by averaging in confidently adapted ones) and a priority queue of visual prototypes
(a few low-entropy test features a class, averaged per class). Each sample learns two residuals from
zero, one on the textual prototypes and one on the visual ones, with one AdamW step on its prediction's
entropy plus an alignment (InfoNCE) loss between each cached class's visual and textual prototype,
and is predicted with the adapted prototypes. As the reference (zhangce01/DPE-CLIP fecae5a) computes
it, per sample, in ``main_dpe.py`` ``run_test_dpe``:

1. The residuals are fresh zeros for every sample (``TextResidue`` and ``PositiveCacheResidue`` built
   anew in the loop): what a sample learns reaches later samples only through the textual evolution
   (5.). The class features are ``normalize(global + text residual)`` per class; the ``global``
   prototypes themselves are a running average, not normalised again.
2. ``utils.py`` ``get_clip_logits`` summarises the sample with those class features
   (:func:`tta.methods.tda.summarise_views`): one view, itself; several (the ImageNet family: the
   original and 63 AugMix views, ImageNet itself included, unlike TDA), the unnormalised mean feature
   and the mean logits of the ``int(0.1 * V)`` lowest-entropy views, their averaged-probability entropy
   as the loss, the arg-max of the mean logits as the pseudo-label. The logits keep their graph back to
   the text residual.
3. The visual queue is updated with ``(feature, loss / log2 C)`` under the pseudo-label BEFORE the sample
   is adapted and predicted (``update_cache``, TDA's rule: a class's entries sorted by that value, a full
   class replacing its last entry only when strictly lower: :class:`tta.methods.tda.ClassCache`).
   ``get_entropy`` divides the natural-log entropy by ``log2 C`` (the order is unchanged by it; the
   threshold of 5. is on that scale; ``entropy_norm="ln"`` divides by ``ln C``).
4. ``cache_key_value``: each cached class's visual prototype is the mean of its entries (classes
   ascending), and the keys are ``normalize(prototype + image residual)``. One AdamW step
   (``lr_text`` on the text residual, ``lr_image`` on the image residual, both with ``eps=1e-3`` and
   ``weight_decay=0.1``; the loop's ``steps = 1``) on ``entropy(logits + cache logits)`` plus
   ``align_weight`` times InfoNCE (the ``info-nce-pytorch`` package: both sides normalised, cosine logits
   over temperature 0.01, the matching class the target, mean over the cached classes) between the keys
   and their classes' text features. The cache logits are ``alpha * exp(-beta * (1 - q . key))`` on each
   key's class (``compute_cache_logits``), ``q`` the summary's feature of 2.
5. The prediction, without gradients, with the stepped residuals: the logits of the ORIGINAL view alone
   (``get_clip_logits(images[0])``) on every data set but ImageNet-A, where the confident views are
   summarised again with the adapted text (``dataset_name == 'A'``): ``prediction_views`` is
   ``"original"`` or ``"confident"``; plus the adapted keys' cache logits with that feature as query.
   When the prediction's entropy over ``log2 C`` is below ``text_update_threshold`` (0.1, strict), the
   adapted class features join the global prototypes' running average (the initial ones count as one
   member: ``global = global * n / (n + 1) + adapted / (n + 1)`` at the ``n``-th update).
6. Precision: the reference loads CLIP with ``clip.load`` on CUDA (fp16 weights) and runs the loop under
   autocast, its residuals fp16 parameters. Here everything runs in float32 on the view features as they
   arrive (rounded to fp16 under ``16-mixed``): the residuals' single AdamW step is that of fp32 tensors.
7. The logit scale: the reference hard-codes ``100.``; the state takes the model's ``logit_scale``, which
   is 100 for CLIP ViT-B/16. The class features are ``utils.py`` ``clip_classifier``'s: the templates and
   the class's CuPL sentences embedded, normalised, averaged and normalised again
   (``ZeroShotClassifier(class_prompts=...)``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tta.methods.entropy import entropy
from tta.methods.online import OnlineMethod
from tta.methods.tda import ClassCache, summarise_views

#: What the entropy (in nats) is divided by before the threshold: log2 C (the reference) or ln C.
ENTROPY_NORMS = ("log2", "ln")
#: The features a prediction is made from: the original view (the reference, but on ImageNet-A) or the confident views.
PREDICTION_VIEWS = ("original", "confident")
#: The AdamW settings of both residuals' parameter groups (``run_test_dpe``).
ADAMW_EPS, ADAMW_WEIGHT_DECAY = 1e-3, 1e-1
#: The InfoNCE temperature (``InfoNCELoss``).
ALIGN_TEMPERATURE = 0.01


def info_nce(query: torch.Tensor, keys: torch.Tensor, temperature: float = ALIGN_TEMPERATURE) -> torch.Tensor:
    """InfoNCE without explicit negatives (``info-nce-pytorch``'s ``info_nce``): row ``i`` of ``query``
    should match row ``i`` of ``keys`` against the other rows; cosine logits over ``temperature``."""
    logits = F.normalize(query, dim=-1) @ F.normalize(keys, dim=-1).T
    return F.cross_entropy(logits / temperature, torch.arange(len(query), device=query.device))


def prototype_logits(
    query: torch.Tensor, keys: torch.Tensor, classes: torch.Tensor, n_classes: int, alpha: float, beta: float
) -> torch.Tensor:
    """``compute_cache_logits`` (``C``): ``alpha * exp(-beta * (1 - query . key))`` on each key's class."""
    kernel = ((-1) * (beta - beta * (keys @ query))).exp()
    return alpha * (kernel @ F.one_hot(classes, n_classes).to(kernel.dtype))


class DPEState(OnlineMethod):
    """DPE's evolving textual prototypes and queue of visual prototypes over one stream (see the module doc).

    Args:
        text_features: ``C x D`` normalised class features.
        logit_scale: the model's (100 for CLIP; the reference hard-codes 100).
        shot_capacity: entries a class in the visual queue (``configs/*.yaml`` ``positive.shot_capacity``).
        alpha, beta: the visual prototypes' logit weight and kernel sharpness (``positive.alpha``, ``.beta``).
        lr_text, lr_image: the AdamW learning rates of the text and image residuals (``learning_rate``).
        align_weight: the weight of the InfoNCE alignment loss (``learning_rate.align``).
        text_update_threshold: a prediction with a normalised entropy below it evolves the text prototypes.
        prediction_views: ``"original"`` (the reference but on ImageNet-A) or ``"confident"`` (on ImageNet-A).
        entropy_norm: ``"log2"`` (the reference) or ``"ln"``: what the entropy is divided by.
    """

    def __init__(
        self,
        text_features: torch.Tensor,
        logit_scale: float,
        shot_capacity: int = 3,
        alpha: float = 6.0,
        beta: float = 5.0,
        lr_text: float = 6e-4,
        lr_image: float = 6e-4,
        align_weight: float = 0.5,
        text_update_threshold: float = 0.1,
        prediction_views: str = "original",
        entropy_norm: str = "log2",
    ) -> None:
        if entropy_norm not in ENTROPY_NORMS:
            raise ValueError(f"entropy_norm must be one of {ENTROPY_NORMS}, got {entropy_norm!r}")
        if prediction_views not in PREDICTION_VIEWS:
            raise ValueError(f"prediction_views must be one of {PREDICTION_VIEWS}, got {prediction_views!r}")
        self.text = text_features.float()
        self.logit_scale = float(logit_scale)
        self.alpha, self.beta = alpha, beta
        self.lr_text, self.lr_image, self.align_weight = lr_text, lr_image, align_weight
        self.text_update_threshold, self.prediction_views = text_update_threshold, prediction_views
        n_classes, dim = self.text.shape
        self.entropy_divisor = math.log2(n_classes) if entropy_norm == "log2" else math.log(n_classes)
        #: The evolving textual prototypes (``C x D``, a running average: not unit norm) and their update count.
        self.global_text = self.text.clone()
        self.updates = torch.zeros((), dtype=torch.int64, device=self.text.device)
        self.cache = ClassCache(n_classes, shot_capacity, dim, device=self.text.device)

    def normalised_entropy(self, loss: torch.Tensor) -> float:
        """``get_entropy``: the loss divided in its own dtype (a float32 division, as the reference's tensor)."""
        return float(loss.detach() / self.entropy_divisor)

    def text_residual(self) -> torch.Tensor:
        """This sample's text residual: fresh zeros (``TextResidue`` built anew each sample)."""
        return torch.zeros_like(self.global_text, requires_grad=True)

    def prototypes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``cache_key_value``: the mean of each cached class's entries (``K x D``) and those classes (``K``)."""
        classes = self.cache.count.nonzero().flatten()
        counts = self.cache.count[classes]
        valid = self.cache.valid()[classes]
        features = self.cache.features[classes] * valid[..., None]
        return (features / counts[:, None, None]).sum(1), classes

    def predict(self, views: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The prediction's feature and zero-shot logits with the adapted ``text`` (step 5)."""
        if self.prediction_views == "confident":
            summary = summarise_views(views, text, self.logit_scale)
            return summary.feature, summary.logits
        return views[0], self.logit_scale * views[0] @ text.T

    def step(self, view_features: torch.Tensor) -> torch.Tensor:
        views = view_features.detach().float()
        n_classes = len(self.text)
        text_residual = self.text_residual()
        text = F.normalize(self.global_text + text_residual, dim=-1)
        summary = summarise_views(views, text, self.logit_scale)
        self.cache.add(summary.pred, summary.feature, torch.tensor(self.normalised_entropy(summary.loss)))
        prototypes, classes = self.prototypes()
        image_residual = torch.zeros_like(prototypes, requires_grad=True)
        groups = [{"params": [text_residual], "lr": self.lr_text}]
        logits = summary.logits
        if len(classes):  # the reference's `if pos_enabled and pos_cache`: always, once the sample is queued
            keys = F.normalize(prototypes + image_residual, dim=-1)
            logits = logits + prototype_logits(summary.feature, keys, classes, n_classes, self.alpha, self.beta)
            loss = entropy(logits) + self.align_weight * info_nce(keys, text[classes])
            groups.append({"params": [image_residual], "lr": self.lr_image})
        else:
            loss = entropy(logits)
        optimizer = torch.optim.AdamW(groups, eps=ADAMW_EPS, weight_decay=ADAMW_WEIGHT_DECAY)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            text = F.normalize(self.global_text + text_residual, dim=-1)
            feature, logits = self.predict(views, text)
            if len(classes):
                keys = F.normalize(prototypes + image_residual, dim=-1)
                logits = logits + prototype_logits(feature, keys, classes, n_classes, self.alpha, self.beta)
            if self.normalised_entropy(entropy(logits)) < self.text_update_threshold:
                self.updates += 1
                n = int(self.updates)
                self.global_text = self.global_text * (n / (n + 1)) + text * (1 / (n + 1))
        return logits.float()

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {"global_text": self.global_text, "updates": self.updates, **self.cache.state_dict("cache.")}
        return {key: value.detach().clone().contiguous() for key, value in state.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        state = {key: value.to(self.text.device) for key, value in state.items()}
        if state["global_text"].shape != self.global_text.shape:
            raise ValueError(
                f"global_text has shape {tuple(state['global_text'].shape)}, the state "
                f"{tuple(self.global_text.shape)}: a state of another class list or dimension"
            )
        self.cache.load_state_dict(state, "cache.")
        self.global_text = state["global_text"].float().clone()
        self.updates = state["updates"].to(torch.int64).clone()

    def size(self) -> int:
        return self.cache.size()
