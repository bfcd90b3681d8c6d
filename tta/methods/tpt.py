"""TPT: test-time prompt tuning (Shu et al., NeurIPS 2022), batched over images.

Per image: encode V views once (no grad), keep the 10% lowest-entropy views under the initial
prompt, take one AdamW step (lr 5e-3, fresh state) on the context tokens to minimise the
entropy of the kept views' averaged prediction, then predict on the original view (index 0)
with the tuned prompt. Each image has its own context; because AdamW acts elementwise and the
summed loss gives each context only its own image's gradient, adapting B images at once in
one tensor gives the same result as adapting them one at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import NamedTuple

import torch

from tta.methods.entropy import gather_views, marginal_entropy, select_confident
from tta.models.prompt import PromptLearner

LogitFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Adapted(NamedTuple):
    """What a view method returns: logits of each image (``B x C``), the kept views
    (``B x k`` indices) and the adapted variables (TPT: contexts; STS: coefficients)."""

    logits: torch.Tensor
    selected: torch.Tensor
    variables: torch.Tensor


def tpt_adapt(
    prompt: PromptLearner,
    view_features: torch.Tensor,
    logit_fn: LogitFn,
    lr: float = 5e-3,
    steps: int = 1,
    selection: float = 0.1,
    weight_decay: float = 0.01,
    autocast: AbstractContextManager | None = None,
    scaler: torch.amp.GradScaler | None = None,
    checkpoint: bool = False,
    text_penalty: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Adapted:
    """Adapt one context per image; the logits are those of the original views.

    ``view_features``: ``B x V x D`` L2-normalised image features, view 0 the original.
    ``logit_fn(image_features, text_features)`` applies the model's scale and bias.
    ``scaler``: the run's GradScaler when the autocast dtype is float16 (TPT's reference keeps one,
    ``init_scale=1000``, for the whole run); one ``scaler.step`` per step for the B images together,
    so with B > 1 an inf/NaN gradient of one image skips the step of all B (the reference adapts one
    image at a time: B = 1 reproduces its sequence of scales and skipped steps). ``checkpoint``:
    recompute text-tower blocks in the backward pass (memory for compute; the result is the same).
    ``text_penalty``: a term added to each image's loss from its class text features (``B x C x D`` ->
    ``B``), computed in the same forward pass as the entropy (C-TPT's dispersion term).
    """
    autocast = autocast or nullcontext()
    b = view_features.shape[0]
    with torch.no_grad(), autocast:
        initial = prompt.text_features(prompt.initial_context)  # C x D, shared by all images
        selected = select_confident(logit_fn(view_features, initial), selection)
    kept = gather_views(view_features, selected)  # B x k x D
    context = prompt.initial_context.float().expand(b, -1, -1).clone().requires_grad_(True)
    optimizer = torch.optim.AdamW([context], lr=lr, weight_decay=weight_decay)
    for _ in range(steps):
        with autocast:
            text = prompt.text_features(context, checkpoint)
            loss = marginal_entropy(logit_fn(kept, text))
            if text_penalty is not None:
                loss = loss + text_penalty(text)
            loss = loss.sum()
        optimizer.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
    with torch.no_grad(), autocast:
        logits = logit_fn(view_features[:, :1], prompt.text_features(context))[:, 0]
    return Adapted(logits.float(), selected, context.detach())
