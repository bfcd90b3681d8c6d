"""Zero-shot classification as a LightningModule: the model every TTA callback adapts."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from typing_extensions import override

from tta.metrics import summarize
from tta.models.vlm import (
    VisionLanguageModel,
    check_class_names,
    check_templates,
    comparable_name,
    misplaced_class_name,
)
from tta.tasks.base import OverVLM
from tta.validation import check_finite


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


#: What to change when a model's own logits are not finite.
NON_FINITE_MODEL_HINT = (
    "check the model's weights (model.vlm.pretrained: a damaged or half-trained checkpoint?), or run in full "
    "precision (trainer.precision=32-true)"
)


def predict_outputs(module: pl.LightningModule, batch: dict[str, Any], batch_idx: int = 0) -> dict[str, Any]:
    """The documented prediction dict of a classifier whose ``forward`` gives logits, probs and
    image features: the batch is checked, its label, index and domain are passed on, and logits
    that are not finite stop the run (:class:`~tta.validation.NonFiniteError`)."""
    check_batch(batch, len(module.class_names))
    out = module(batch["image"])
    check_finite(out["logits"], batch["index"], "the model", module._trainer, batch_idx, NON_FINITE_MODEL_HINT)
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


def read_class_prompts(path: str | None) -> tuple[dict[str, list[str]] | None, str | None]:
    """The sentences per class name of a CuPL-style JSON file, and the file's SHA-256; ``(None, None)``
    without a file. A file that is missing or not ``{name: [sentence, ...]}`` is refused by name."""
    if path is None:
        return None, None
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise ValueError(
            f"model.class_prompts: cannot read {path} ({error.strerror or error}): give the path of a JSON file of "
            'sentences per class, e.g. CuPL\'s {"class name": ["a photo of ...", ...]}'
        ) from None
    try:
        sentences = json.loads(data)
    except ValueError as error:
        raise ValueError(f"model.class_prompts: {path} is not JSON ({error})") from None
    if not (
        isinstance(sentences, dict)
        and all(isinstance(v, list) and all(isinstance(s, str) for s in v) for v in sentences.values())
    ):
        raise ValueError(f"model.class_prompts: {path} is not an object of class name -> list of sentences")
    return sentences, hashlib.sha256(data).hexdigest()


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

    ``class_prompts``: a JSON file of sentences per class name (CuPL's ``{"class": ["...", ...]}``, as
    DMN-ZS and DPE read them): each class's features ensemble the templates filled with its name and
    its own sentences. A class is looked up by its name, then with spaces for underscores, then
    ignoring case, spaces and underscores; the file's SHA-256 is part of the run key.
    """

    def __init__(
        self,
        vlm: VisionLanguageModel,
        class_names: Sequence[str] | None = None,
        templates: Sequence[str] = ("a photo of a {}.",),
        class_prompts: str | None = None,
    ) -> None:
        super().__init__()
        self.vlm = vlm
        self.class_names = None if class_names is None else check_class_names(class_names)
        self.templates = check_templates(templates)
        self.class_prompts = None if class_prompts is None else str(class_prompts)
        self._sentences, self._sentences_sha256 = read_class_prompts(self.class_prompts)

    def check_datamodule(self, datamodule: Any) -> None:
        """Refuse class names that are the datamodule's in another order (labels index the
        datamodule's list, prompts use this one), and a ``class_prompts`` file without one of its
        classes: called at ``setup``, and by ``tta-predict`` before it writes anything."""
        names = getattr(datamodule, "class_names", None)
        if names or self.class_names:
            self.sentences_per_class(self.class_names or names)
        if self.class_names is None or not names:
            return
        misplaced = misplaced_class_name(self.class_names, names)
        if misplaced is not None:
            i, j = misplaced
            raise ValueError(
                f"model.class_names {self.class_names} are the data set's classes in another order (case, "
                f"spaces and underscores aside, {self.class_names[i]!r} is at position {i} but names the data "
                f"set's class {j}), which would swap their labels: give them in the data set's order "
                f"{list(names)}, or leave model.class_names unset"
            )

    @override
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        names = getattr(datamodule, "class_names", None)
        self.check_datamodule(datamodule)
        if self.class_names is None:
            if names is None:
                raise ValueError(
                    "no class names: pass class_names to ZeroShotClassifier or use a "
                    "datamodule with a class_names attribute"
                )
            self.class_names = check_class_names(names)

    def text_features(self) -> torch.Tensor:
        """Normalised class features (C x D), cached by the wrapper."""
        return self.vlm.class_text_features(self.class_names, self.templates, self.sentences_per_class())

    def sentences_per_class(self, class_names: Sequence[str] | None = None) -> list[list[str]] | None:
        """Each class's sentences from ``class_prompts`` (``None`` without the file); a class the file
        does not name is refused, naming it and the file."""
        if self._sentences is None:
            return None
        found = []
        by_comparable = {comparable_name(key): key for key in self._sentences}
        for name in class_names or self.class_names:
            for key in (name, name.replace("_", " "), by_comparable.get(comparable_name(name))):
                if key in self._sentences:
                    found.append(self._sentences[key])
                    break
            else:
                raise ValueError(
                    f"model.class_prompts {self.class_prompts} has no sentences for the class {name!r} (its names "
                    f"are e.g. {list(self._sentences)[:3]}): give the file of this data set's classes"
                )
        return found

    def class_prompts_fingerprint(self) -> dict[str, str] | None:
        """What the run key records of ``class_prompts``: the file's name and SHA-256."""
        if self.class_prompts is None:
            return None
        return {"file": Path(self.class_prompts).name, "sha256": self._sentences_sha256}

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        self.vlm.check_images(images)
        image_features = self.vlm.encode_image(images)
        logits = self.vlm.logits(image_features, self.text_features())
        return {"logits": logits, "probs": logits.softmax(-1), "image_features": image_features}

    @override
    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        return predict_outputs(self, batch, batch_idx)
