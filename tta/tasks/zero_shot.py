"""Zero-shot classification as a LightningModule: the model every TTA callback adapts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from typing_extensions import override

from tta.metrics import summarize
from tta.models.vlm import VisionLanguageModel, check_class_names, check_templates
from tta.tasks.base import OverVLM


def check_batch(batch: dict[str, Any], n_classes: int) -> None:
    """Clear errors for a batch that breaks the contract (see ``tta.datamodules``)."""
    missing = {"image", "label", "index", "domain"} - set(batch)
    if missing:
        raise KeyError(
            f"batch lacks {sorted(missing)}: a datamodule must yield dicts with "
            "image, label, index and domain (see tta.datamodules)"
        )
    labels = batch["label"]
    known = labels[labels >= 0]
    if known.numel() and int(known.max()) >= n_classes:
        raise ValueError(
            f"label {int(known.max())} is outside the class list of {n_classes} classes: "
            "the datamodule's labels and the class names disagree"
        )
    if torch.isnan(batch["image"]).any():
        bad = batch["index"][torch.isnan(batch["image"]).flatten(1).any(1)].tolist()
        raise ValueError(f"images with sample index {bad} contain NaN: check the data source")


def predict_outputs(module: pl.LightningModule, batch: dict[str, Any]) -> dict[str, Any]:
    """The documented prediction dict of a classifier whose ``forward`` gives logits, probs and
    image features: the batch is checked, and its label, index and domain are passed on."""
    check_batch(batch, len(module.class_names))
    out = module(batch["image"])
    out.update(label=batch["label"], index=batch["index"], domain=list(batch["domain"]))
    return out


class ClassifierPredictions:
    """How classifiers' predictions are written (``tta.callbacks.writer.PredictionTask``): one
    row per image with the adapted and the unadapted prediction; accuracy and ECE per domain;
    the running accuracy on the progress bar."""

    prediction_columns = ("index", "domain", "label", "pred", "confidence", "pred_zs", "confidence_zs")

    def prediction_rows(self, outputs: dict[str, Any]) -> list[dict[str, Any]]:
        confidence, pred = outputs["probs"].detach().float().cpu().max(-1)
        zs = outputs.get("probs_zs")
        confidence_zs, pred_zs = zs.detach().float().cpu().max(-1) if zs is not None else (None, None)
        return [
            {
                "index": int(outputs["index"][i]),
                "domain": outputs["domain"][i],
                "label": int(outputs["label"][i]),
                "pred": int(pred[i]),
                "confidence": f"{confidence[i]:.6f}",
                "pred_zs": None if pred_zs is None else int(pred_zs[i]),
                "confidence_zs": None if confidence_zs is None else f"{confidence_zs[i]:.6f}",
            }
            for i in range(len(pred))
        ]

    def summarize_predictions(self, rows: list[dict[str, str]]) -> dict[str, Any]:
        return summarize(
            [int(r["pred"]) for r in rows],
            [int(r["label"]) for r in rows],
            [float(r["confidence"]) for r in rows],
            [r["domain"] for r in rows],
        )

    def progress_values(self, row: dict[str, str]) -> dict[str, float | None]:
        labelled = int(row["label"]) >= 0
        return {"acc": float(row["pred"] == row["label"]) if labelled else None}


class ZeroShotClassifier(ClassifierPredictions, OverVLM, pl.LightningModule):
    """Classify images by cosine similarity to class prompts.

    ``predict_step`` returns, per batch (all tensors on the model's device):

    - ``logits`` (B x C): ``logit_scale * cos(image, class) (+ logit_bias)``
    - ``probs`` (B x C): softmax of ``logits``
    - ``image_features`` (B x D): L2-normalised image embeddings
    - ``label`` (B, long): the true class, ``-1`` where unknown
    - ``index`` (B, long): the sample's index in its dataset
    - ``domain`` (list of B str): the domain each sample comes from

    TTA callbacks replace ``logits``/``probs`` with adapted ones and keep the originals as
    ``logits_zs``/``probs_zs``. Class names come from the constructor or, if not given, from
    the datamodule's ``class_names``.
    """

    def __init__(
        self,
        vlm: VisionLanguageModel,
        class_names: Sequence[str] | None = None,
        templates: Sequence[str] = ("a photo of a {}.",),
    ) -> None:
        super().__init__()
        self.vlm = vlm
        self.class_names = None if class_names is None else check_class_names(class_names)
        self.templates = check_templates(templates)

    @override
    def setup(self, stage: str) -> None:
        if self.class_names is None:
            datamodule = getattr(self.trainer, "datamodule", None)
            names = getattr(datamodule, "class_names", None)
            if names is None:
                raise ValueError(
                    "no class names: pass class_names to ZeroShotClassifier or use a "
                    "datamodule with a class_names attribute"
                )
            self.class_names = check_class_names(names)

    def text_features(self) -> torch.Tensor:
        """Normalised class features (C x D), cached by the wrapper."""
        return self.vlm.class_text_features(self.class_names, self.templates)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        self.vlm.check_images(images)
        image_features = self.vlm.encode_image(images)
        logits = self.vlm.logits(image_features, self.text_features())
        return {"logits": logits, "probs": logits.softmax(-1), "image_features": image_features}

    @override
    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        return predict_outputs(self, batch)
