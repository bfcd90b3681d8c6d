"""C-TPT: calibrated test-time prompt tuning (Yoon et al., ICLR 2024).

TPT (:mod:`tta.methods.tpt`: the same views, confident-view selection under the initial prompt,
fresh AdamW, prediction on the original view) with one more term in each step's loss: minus
``lambda`` times the average text feature dispersion (ATFD) of the tuned prompt's class features,

    ATFD = mean over classes c of || t_c - mean_c' t_c' ||_2,

``t_c`` the L2-normalised class text features of the step's forward pass, the distance a plain
(not squared) L2 norm. Maximising the dispersion spreads the class features apart, which the
paper links to lower calibration error. As ``tpt_classification.py`` with ``--run_type tpt_ctpt``
computes it (``clip/custom_clip.py``: ``l2_norm_mean_training``); its ``scripts/`` set ``lambda``
20 on the natural shifts (ImageNet and its variants, with ``--I_augmix``: AugMix views) and 50 on
the fine-grained sets (AugMix views), one step at lr 5e-3, 64 views, 10% kept, context
"a photo of a". The ``--two_step`` variant the code also holds is used by no script and is not
implemented.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from tta.methods.tpt import Adapted, LogitFn, tpt_adapt
from tta.models.prompt import PromptLearner


def text_feature_dispersion(text_features: torch.Tensor) -> torch.Tensor:
    """ATFD: the mean L2 distance of the class features to their centroid (``... x C x D`` -> ``...``)."""
    centroid = text_features.mean(-2, keepdim=True)
    return torch.linalg.norm(text_features - centroid, dim=-1).mean(-1)


def dispersion_penalty(weight: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """C-TPT's term of the loss: ``-weight * ATFD`` (the dispersion is maximised)."""
    return lambda text_features: -weight * text_feature_dispersion(text_features)


def ctpt_adapt(
    prompt: PromptLearner, view_features: torch.Tensor, logit_fn: LogitFn, lambda_term: float = 20.0, **tpt_options
) -> Adapted:
    """TPT with the dispersion term weighted by ``lambda_term``; ``tpt_options`` as :func:`tpt_adapt`'s."""
    return tpt_adapt(prompt, view_features, logit_fn, text_penalty=dispersion_penalty(lambda_term), **tpt_options)
