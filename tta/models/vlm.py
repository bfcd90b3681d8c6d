"""``VisionLanguageModel``: one open_clip model with its tokenizer, preprocessing and class cache."""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Sequence
from functools import cache, cached_property

import torch
import torch.nn as nn
import torch.nn.functional as F

from tta.models.text_tower import TextTower


def check_class_names(class_names: Sequence[str]) -> list[str]:
    """Class names as a list, or a clear error for an empty list or blanks.

    Duplicates pass with a warning: the classes that share a name get the same text features (and
    the first of them wins every tie), which is what CLIP and TPT do with ImageNet's "missile" and
    "sunglasses"."""
    names = [str(n) for n in class_names]
    if not names:
        raise ValueError("class_names is empty: give at least two class names (or a data set that has them)")
    blank = [i for i, n in enumerate(names) if not n.strip()]
    if blank:
        raise ValueError(f"class_names has empty names at positions {blank}: every class needs a name")
    duplicates = tuple(sorted(n for n, count in Counter(names).items() if count > 1))
    if duplicates:
        _warn_duplicates(duplicates)
    return names


def comparable_name(name: str) -> str:
    """A class name as prompts tell names apart: case, underscores, hyphens and runs of spaces aside
    (``"Red_circle"`` and ``"red  circle"`` name the same class)."""
    return " ".join(str(name).replace("_", " ").replace("-", " ").lower().split())


def misplaced_class_name(given: Sequence[str], reference: Sequence[str]) -> tuple[int, int] | None:
    """``(i, j)`` where ``given[i]`` names (as :func:`comparable_name` compares) the class at position
    ``j != i`` of ``reference`` and not its own: a list in another order, whose labels would be
    swapped; ``None`` where no name is out of place."""
    positions: dict[str, set[int]] = {}
    for j, name in enumerate(reference):
        positions.setdefault(comparable_name(name), set()).add(j)
    for i, name in enumerate(given):
        found = positions.get(comparable_name(name), set())
        if found and i not in found:
            return i, min(found)
    return None


@cache
def _warn_duplicates(duplicates: tuple[str, ...]) -> None:
    """Once per process and list of duplicates (the names are checked by several layers)."""
    warnings.warn(
        f"class_names has duplicates {list(duplicates)}: the classes that share a name get the same text "
        "features (as in CLIP's and TPT's ImageNet list; data.class_list=unique renames ImageNet's two)",
        stacklevel=3,
    )


def check_templates(templates: Sequence[str]) -> list[str]:
    templates = [str(t) for t in templates]
    if not templates or any("{}" not in t for t in templates):
        raise ValueError(
            f"templates must be a non-empty list of strings with a '{{}}' for the class "
            f"name, e.g. ['a photo of a {{}}.'], got {templates!r}"
        )
    return templates


def check_images(
    images: torch.Tensor, expected_size: tuple[int, int] | None, model_name: str, size_hint: str = ""
) -> None:
    """Clear errors for images that are not ``B x 3 x H x W`` float RGB at ``expected_size``
    (None: any size)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(
            f"images must be B x 3 x H x W (RGB), got shape {tuple(images.shape)}; "
            "convert grey or RGBA images to RGB in the datamodule"
        )
    if not images.is_floating_point():
        raise ValueError(f"images must be float in [0, 1], got dtype {images.dtype}; divide uint8 images by 255")
    if expected_size is not None and tuple(images.shape[-2:]) != tuple(expected_size):
        raise ValueError(
            f"images are {tuple(images.shape[-2:])} but {model_name} expects {tuple(expected_size)}: "
            f"set the datamodule's image_size to {expected_size[0]}{size_hint}"
        )


class VisionLanguageModel(nn.Module):
    """Image and text towers of an open_clip model behind one interface.

    Images come in raw: float in [0, 1], ``B x 3 x H x W`` at the model's ``image_size``, resized
    as :attr:`preprocessing` says (the datamodules do it); the wrapper applies the model's own
    mean/std normalisation. Class text features (one prompt
    per template, ensembled by averaging normalised features) are cached and recomputed only
    when the class names, templates or device change.
    """

    def __init__(self, model: nn.Module, tokenizer, preprocess_cfg: dict, name: str) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.preprocess_cfg = dict(preprocess_cfg)
        size = preprocess_cfg["size"]
        self.image_size: tuple[int, int] = (size, size) if isinstance(size, int) else tuple(size)
        self.resize_mode: str = preprocess_cfg.get("resize_mode", "shortest")
        self.interpolation: str = preprocess_cfg.get("interpolation", "bicubic")
        self.register_buffer("mean", torch.tensor(preprocess_cfg["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(preprocess_cfg["std"]).view(1, 3, 1, 1), persistent=False)
        self._class_cache: dict[tuple, torch.Tensor] = {}

    @cached_property
    def text_tower(self) -> TextTower:
        """Embeddings-level text tower (for prompt learning); raises for unsupported towers."""
        return TextTower(self.model)

    @property
    def device(self) -> torch.device:
        return self.mean.device

    @property
    def preprocessing(self) -> dict[str, int | str]:
        """How images must be resized for this model (open_clip's ``preprocess_cfg``), as the
        datamodules' ``image_size``, ``resize_mode`` and ``interpolation`` arguments."""
        return {"image_size": self.image_size[0], "resize_mode": self.resize_mode, "interpolation": self.interpolation}

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.exp()

    @property
    def logit_bias(self) -> torch.Tensor | None:
        return getattr(self.model, "logit_bias", None)

    def check_images(self, images: torch.Tensor) -> None:
        """Clear errors for the commonest image mistakes, before any tower runs."""
        check_images(images, self.image_size, self.name)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)

    def encode_image(self, images: torch.Tensor, normalize: bool = True, batch_size: int | None = None) -> torch.Tensor:
        """Image features of raw images in [0, 1] (L2-normalised unless ``normalize=False``).

        ``batch_size`` runs the tower on chunks of that many images: many views at once are
        slower per image on a CPU than chunks of a few dozen (cache-bound convolutions).
        """
        if batch_size is not None and len(images) > batch_size:
            return torch.cat([self.encode_image(chunk, normalize) for chunk in images.split(batch_size)])
        features = self.model.encode_image(self.normalize(images))
        return F.normalize(features, dim=-1) if normalize else features

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(texts)).to(self.device)

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        features = self.model.encode_text(tokens)
        return F.normalize(features, dim=-1) if normalize else features

    @torch.no_grad()
    def class_text_features(
        self,
        class_names: Sequence[str],
        templates: Sequence[str],
        class_prompts: Sequence[Sequence[str]] | None = None,
        batch_size: int = 1024,
    ) -> torch.Tensor:
        """``C x D`` normalised class features, cached: each class's the normalised mean of the
        normalised embeddings of its prompts, the templates filled with its name plus, with
        ``class_prompts``, its own sentences (``class_prompts[c]``: CuPL's descriptions, as the
        references that use them ensemble them)."""
        names, templates = tuple(check_class_names(class_names)), tuple(check_templates(templates))
        extra = None if class_prompts is None else tuple(tuple(prompts) for prompts in class_prompts)
        if extra is not None and len(extra) != len(names):
            raise ValueError(f"class_prompts has {len(extra)} lists for {len(names)} classes: give one per class")
        key = (names, templates, extra, self.device)
        if key not in self._class_cache and extra is None:  # the same prompts for every class: one batch each
            per_template = torch.stack(
                [self.encode_text(self.tokenize([t.format(n) for n in names])) for t in templates]
            )  # T x C x D
            self._class_cache = {key: F.normalize(per_template.mean(0), dim=-1)}
        elif key not in self._class_cache:
            texts = [[t.format(n) for t in templates] + list(extra[c]) for c, n in enumerate(names)]
            flat = [text for prompts in texts for text in prompts]
            embeddings = torch.cat(
                [self.encode_text(self.tokenize(flat[i : i + batch_size])) for i in range(0, len(flat), batch_size)]
            )
            owner = torch.repeat_interleave(
                torch.arange(len(names), device=embeddings.device),
                torch.tensor([len(prompts) for prompts in texts], device=embeddings.device),
            )
            sums = torch.zeros(len(names), embeddings.shape[-1], dtype=embeddings.dtype, device=embeddings.device)
            # the mean of each class's prompts; normalised, so the count's division does not matter
            self._class_cache = {key: F.normalize(sums.index_add_(0, owner, embeddings), dim=-1)}
        return self._class_cache[key]

    def logits(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """``scale * cos + bias`` for normalised features; ``text_features`` may be batched
        (``B x C x D`` against ``B x ... x D`` images)."""
        if text_features.ndim == 2:
            logits = image_features @ text_features.T
        else:
            logits = image_features @ text_features.transpose(-1, -2)
        logits = self.logit_scale * logits
        bias = self.logit_bias
        return logits if bias is None else logits + bias
