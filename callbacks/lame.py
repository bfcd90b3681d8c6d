"""LAME as a callback: adjusts each batch's probabilities with its image features."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from typing_extensions import override

from tta.callbacks.base import TTACallback
from tta.methods.lame import check_lame_args, laplacian_adjust


class LAME(TTACallback):
    """Laplacian adjusted maximum-likelihood over each predicted batch. See :mod:`tta.methods.lame`.

    LAME reads the batch's current ``probs`` (those of the model, or of the callback before it
    in the list: ``[STS(), LAME()]`` adjusts STS's predictions) and its ``image_features``, and
    writes the log of the adjusted probabilities as ``logits``. It works with any module whose
    ``predict_step`` returns both (``ZeroShotClassifier``, ``TimmClassifier``).

    The batch is the neighbourhood LAME smooths over, so the datamodule's ``batch_size`` is its
    key setting: a batch of one leaves predictions (almost) unchanged, and a batch that mixes
    many classes gives each sample few neighbours of its own class. The paper reports it
    insensitive to batch sizes 16-128 on non-i.i.d. streams. Results depend on batch size and
    order by design; nothing is carried from one batch to the next.

    Args:
        affinity: "rbf" (paper default), "knn" or "linear".
        k: neighbours for knn; the k-th nearest point (itself counted) sets the rbf bandwidth.
        max_iter: fixed-point iterations at most (paper: 100).
        tol: stop when the objective's relative change is at most this, from the 3rd iteration.
    """

    method_name = "lame"
    batch_level = True

    def __init__(self, affinity: str = "rbf", k: int = 5, max_iter: int = 100, tol: float = 1e-8) -> None:
        super().__init__()
        check_lame_args(affinity, k, max_iter, tol)
        self.affinity, self.k, self.max_iter, self.tol = affinity, k, max_iter, tol

    @override
    def process_batch(
        self, pl_module: pl.LightningModule, outputs: dict[str, Any], batch: dict[str, Any]
    ) -> torch.Tensor:
        if "image_features" not in outputs:
            raise KeyError(
                f"LAME needs the batch's image features: {type(pl_module).__name__}.predict_step "
                "must return 'image_features' (B x D) next to 'probs', as ZeroShotClassifier does"
            )
        with torch.no_grad():
            adjusted = laplacian_adjust(
                outputs["probs"].float(),
                outputs["image_features"].float(),
                affinity=self.affinity,
                k=self.k,
                max_iter=self.max_iter,
                tol=self.tol,
            )
        return adjusted.clamp_min(torch.finfo(adjusted.dtype).tiny).log()
