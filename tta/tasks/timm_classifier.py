"""A plain image classifier over any timm model, with the output contract of ``ZeroShotClassifier``.

Batch-level methods that only need probabilities and features (LAME) work on it unchanged; the
episodic methods (TPT, STS, views) need a vision-language model and refuse it.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import timm
import torch
import torch.nn.functional as F
from timm.data import resolve_model_data_config
from typing_extensions import override

from tta.models.vlm import check_class_names, check_images
from tta.tasks.zero_shot import ClassifierPredictions, predict_outputs


def _check_model_name(model_name: str) -> None:
    if not timm.is_model(model_name):
        close = difflib.get_close_matches(model_name, timm.list_models(), n=5)
        raise ValueError(
            f"unknown timm model {model_name!r}; close matches: {close}. Use a name from "
            "timm.list_models() (the pretrained tag, e.g. '.a1_in1k', may follow it)"
        )


def _check_pretrained(pretrained: bool | str) -> None:
    if isinstance(pretrained, str) and not Path(pretrained).expanduser().is_file():
        raise FileNotFoundError(
            f"pretrained={pretrained!r} is not a file: pass an existing checkpoint "
            "file, true for timm's own weights (needs network), or false for random weights"
        )


class TimmClassifier(ClassifierPredictions, pl.LightningModule):
    """Classify images with a timm model.

    ``predict_step`` returns, per batch, the same dict as :class:`tta.tasks.ZeroShotClassifier`:
    ``logits`` (B x C), ``probs`` (softmax of the logits), ``image_features`` (B x D: the pooled
    pre-logits features, ``forward_head(forward_features(x), pre_logits=True)``, L2-normalised),
    ``label``, ``index`` and ``domain``. Images come in raw (float in [0, 1]) and are normalised
    inside with the mean/std of the model's pretrained config.

    Args:
        model_name: a timm model name (``timm.list_models()``).
        pretrained: False for random weights, True for timm's own weights (needs network), or
            the path of a local checkpoint file (loaded by timm through
            ``pretrained_cfg_overlay=dict(file=...)``), head included: its size must be
            ``num_classes`` (timm's default, 1000 for ImageNet models, when that is None).
        class_names: the classes of the head's outputs, in order; None takes the datamodule's.
        num_classes: outputs of the head. None: the head is sized by the class names; where
            these only come from the datamodule, the model's own head is kept if it already
            has that many outputs and is replaced by a fresh one
            (``reset_classifier``) otherwise.
        model_kwargs: further keyword arguments of ``timm.create_model`` (e.g. ``img_size``).
    """

    def __init__(
        self,
        model_name: str,
        pretrained: bool | str = False,
        class_names: Sequence[str] | None = None,
        num_classes: int | None = None,
        model_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        _check_model_name(model_name)
        _check_pretrained(pretrained)
        self.class_names = None if class_names is None else check_class_names(class_names)
        if num_classes is None and self.class_names is not None:
            num_classes = len(self.class_names)
        if num_classes is not None and (
            isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1
        ):
            raise ValueError(
                f"num_classes must be a positive integer or None (the number of class names), got {num_classes!r}"
            )
        self._fixed_head = num_classes is not None
        self._check_head(num_classes)
        kwargs = dict(model_kwargs or {})
        if num_classes is not None:
            kwargs["num_classes"] = num_classes
        self._model_name = model_name
        self.pretrained, self.model_kwargs = pretrained, dict(model_kwargs or {})
        if isinstance(pretrained, str):
            self.model = self._load_checkpoint(Path(pretrained).expanduser(), num_classes, kwargs)
        else:
            self.model = timm.create_model(model_name, pretrained=pretrained, **kwargs)
        self.model.eval().requires_grad_(False)
        data_config = resolve_model_data_config(self.model)
        self.register_buffer("mean", torch.tensor(data_config["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(data_config["std"]).view(1, 3, 1, 1), persistent=False)
        #: The input size the model needs (H, W), or None where any size works (most CNNs).
        self.fixed_image_size: tuple[int, int] | None = (
            tuple(data_config["input_size"][-2:]) if self.model.pretrained_cfg.get("fixed_input_size") else None
        )
        #: The size the model was trained at: the default image size of the data.
        self.input_size: int = int(data_config["input_size"][-1])
        #: The model's resizing (timm's data config) as the datamodules' arguments. timm's
        #: ``crop_pct`` (resize to size / crop_pct, then crop) is not applied: the shorter side is
        #: resized to the input size, as for CLIP.
        self.preprocessing: dict[str, int | str] = {
            "image_size": self.input_size,
            "resize_mode": "squash" if data_config.get("crop_mode") == "squash" else "shortest",
            "interpolation": data_config.get("interpolation", "bicubic"),
        }

    @property
    def model_name(self) -> str:
        return self._model_name

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    def _load_checkpoint(self, path: Path, num_classes: int | None, kwargs: dict[str, Any]) -> torch.nn.Module:
        # timm drops a checkpoint's head whenever num_classes differs from its pretrained
        # config's (1000 for ImageNet models), so the overlay declares the requested size: a
        # checkpoint with that head is loaded whole, one with another head fails to load.
        overlay = dict(file=str(path)) if num_classes is None else dict(file=str(path), num_classes=num_classes)
        try:
            return timm.create_model(self._model_name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
        except RuntimeError as error:
            head = "timm's default head" if num_classes is None else f"a {num_classes}-class head"
            raise ValueError(
                f"could not load {path} into {self._model_name} with {head} "
                f"({str(error).strip().splitlines()[-1].strip()}): check that the file holds "
                f"{self._model_name} weights and set num_classes to its head's size"
            ) from error

    def _check_head(self, num_classes: int | None) -> None:
        if self.class_names is not None and num_classes is not None and num_classes != len(self.class_names):
            raise ValueError(
                f"num_classes={num_classes} but {len(self.class_names)} class names were given: "
                "pass one name per output of the head, or num_classes=None to size the head "
                "by the class names"
            )

    @override
    def setup(self, stage: str) -> None:
        if self.class_names is not None:
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        names = getattr(datamodule, "class_names", None)
        if names is None:
            raise ValueError(
                "no class names: pass class_names to TimmClassifier or use a datamodule with a class_names attribute"
            )
        names = check_class_names(names)
        if self._fixed_head and self.num_classes != len(names):
            raise ValueError(
                f"the head of {self.model_name} has {self.num_classes} outputs but the datamodule "
                f"has {len(names)} classes: set num_classes={len(names)} (a fresh head) or "
                "num_classes=None, or use a model trained on these classes"
            )
        if self.num_classes != len(names):
            self.model.reset_classifier(len(names))
            self.model.to(self.mean.device).requires_grad_(False)
        self.class_names = names

    def check_images(self, images: torch.Tensor) -> None:
        """Clear errors for the commonest image mistakes, before the model runs."""
        check_images(
            images,
            self.fixed_image_size,
            self.model_name,
            " (or pass model_kwargs={'img_size': ...} where the model supports it)",
        )

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        self.check_images(images)
        normalized = (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)
        feature_maps = self.model.forward_features(normalized)
        pooled = self.model.forward_head(feature_maps, pre_logits=True)
        # The full head rather than get_classifier()(pooled): some timm heads do more after the
        # pre-logits point (distillation heads, extra norms), and pooling twice is cheap.
        logits = self.model.forward_head(feature_maps)
        return {"logits": logits, "probs": logits.softmax(-1), "image_features": F.normalize(pooled, dim=-1)}

    @override
    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        return predict_outputs(self, batch, batch_idx)
