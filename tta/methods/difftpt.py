"""DiffTPT: TPT over conventional and diffusion views, with a cosine filter (Feng et al., ICCV 2023).

Per image the candidates are the original (view 0), ``n_conventional`` crop/flip or AugMix views
and the diffusion views after them (reference: 1 + 64 + 63 = 128). Selection, computed once with
the initial prompt and fixed for all steps:

1. cosine filter: the cosine similarity between the original and each other candidate; the top
   ``cosine_fraction`` (80%) of the other candidates are kept (101 of 127), plus the original. Two readings:
   ``"logits"`` (the reference code): similarity of the logit vectors under the initial prompt,
   one ranking over all candidates; ``"features"`` (the paper's text): similarity of the image
   features, the conventional and the diffusion views ranked and filtered separately;
2. entropy filter: the ``selection`` (30%) lowest-entropy views of the kept set (the original a
   candidate like the others);

then TPT's objective on the selected views, ``steps`` (4) AdamW steps at lr 5e-3 on one context
per image, and the prediction on the original with the tuned prompt (:func:`tta.methods.tpt.tpt_adapt`).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
import torch.nn.functional as F

from tta.methods.entropy import gather_views, n_confident
from tta.methods.tpt import Adapted, LogitFn, tpt_adapt
from tta.models.prompt import PromptLearner

COSINE_READINGS = ("logits", "features")


def cosine_filter(
    view_features: torch.Tensor,
    n_conventional: int,
    fraction: float = 0.8,
    reading: str = "logits",
    logits: torch.Tensor | None = None,
) -> torch.Tensor:
    """Indices (``B x k``) of the views kept by DiffTPT's cosine filter: the original (index 0,
    always first) and the candidates most similar to it, in decreasing similarity.

    ``view_features``: ``B x V x D`` normalised features, view 0 the original, views
    ``1..n_conventional`` conventional, the rest diffusion views. ``logits`` (``B x V x C``, the
    initial prompt's) are needed by the ``"logits"`` reading.
    """
    if reading not in COSINE_READINGS:
        raise ValueError(f"reading must be one of {COSINE_READINGS}, got {reading!r}")
    n_views = view_features.shape[1]
    if not 0 <= n_conventional < n_views:
        raise ValueError(f"n_conventional must be in [0, {n_views - 1}] for {n_views} views, got {n_conventional}")
    original = torch.zeros(view_features.shape[0], 1, dtype=torch.long, device=view_features.device)
    if n_views == 1:
        return original
    if reading == "logits":
        if logits is None:
            raise ValueError("the 'logits' reading compares logit vectors: pass the views' logits")
        similarity = F.cosine_similarity(logits[:, :1].float(), logits[:, 1:].float(), dim=-1)  # B x (V-1)
        groups = [(1, n_views)]
    else:
        similarity = (view_features[:, :1].float() * view_features[:, 1:].float()).sum(-1)
        groups = [(1, n_conventional + 1), (n_conventional + 1, n_views)]
    kept = [original]
    for start, stop in groups:
        if stop > start:
            k = n_confident(stop - start, fraction)
            kept.append(similarity[:, start - 1 : stop - 1].topk(k, dim=1, sorted=True).indices + start)
    return torch.cat(kept, dim=1)


def difftpt_adapt(
    prompt: PromptLearner,
    view_features: torch.Tensor,
    logit_fn: LogitFn,
    n_conventional: int,
    lr: float = 5e-3,
    steps: int = 4,
    cosine_fraction: float = 0.8,
    selection: float = 0.3,
    reading: str = "logits",
    weight_decay: float = 0.01,
    autocast: AbstractContextManager | None = None,
    scaler: torch.amp.GradScaler | None = None,
    checkpoint: bool = False,
) -> Adapted:
    """DiffTPT on ``B x V x D`` normalised features (view 0 the original, then ``n_conventional``
    conventional views, then the diffusion views). ``selected`` holds indices into the V views."""
    logits = None
    if reading == "logits":
        with torch.no_grad(), autocast or nullcontext():
            logits = logit_fn(view_features, prompt.text_features(prompt.initial_context))
    kept = cosine_filter(view_features, n_conventional, cosine_fraction, reading, logits)
    adapted = tpt_adapt(
        prompt,
        gather_views(view_features, kept),
        logit_fn,
        lr=lr,
        steps=steps,
        selection=selection,
        weight_decay=weight_decay,
        autocast=autocast,
        scaler=scaler,
        checkpoint=checkpoint,
    )
    return adapted._replace(selected=kept.gather(1, adapted.selected))
