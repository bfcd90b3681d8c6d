"""Test helpers loaded INSIDE ``tta-predict`` runs of the card tier (``tests/test_cards.py``), by
``_target_`` overrides with ``PYTHONPATH=tests``: a model factory that cuts the number of blocks of
the card's real architecture, and a callback that records what decides published numbers.

Nothing here is part of the package: it exists so that a card's own ``tta-predict`` command runs
unchanged but small (random weights, one block per stage) and reports what it did.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import open_clip
import pytorch_lightning as pl
import torch

import tta.methods.difftpt as difftpt_methods
import tta.methods.sts as sts_methods
import tta.methods.tpt as tpt_methods
import tta.methods.views as views_methods
from tta.callbacks.base import EpisodicTTA
from tta.models import create_vlm


def create_cut_vlm(blocks: int = 1, **kwargs: Any):
    """:func:`tta.models.create_vlm` with every tower's number of blocks cut to ``blocks`` (the
    architecture's widths, activation, tokenizer, context length and preprocessing unchanged)."""
    real = open_clip.create_model

    def cut(model_name: str, **options: Any):
        config = open_clip.get_model_config(model_name)
        vision, text = dict(config["vision_cfg"]), dict(config["text_cfg"])
        layers = vision["layers"]
        vision["layers"] = [min(n, blocks) for n in layers] if isinstance(layers, list) else min(layers, blocks)
        text["layers"] = min(text["layers"], blocks)
        return real(model_name, vision_cfg=vision, text_cfg=text, **options)

    open_clip.create_model = cut
    try:
        return create_vlm(**kwargs)
    finally:
        open_clip.create_model = real


class Probe(pl.Callback):
    """Records the run's settings and counts into ``path`` (JSON) at the end of ``predict``."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.record: dict[str, Any] = {"encoded": [], "selected": [], "cosine_kept": [], "batches": []}

    def _spy(self, module: Any, name: str, key: str, shape_of) -> None:
        real = getattr(module, name)

        def spy(*args: Any, **kwargs: Any):
            out = real(*args, **kwargs)
            self.record[key].append(shape_of(args, out))
            return out

        setattr(module, name, spy)

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        record = self.record
        record["trainer_precision"] = str(trainer.precision)
        names = list(pl_module.class_names)
        record["class_names"] = {
            "n": len(names),
            "duplicates": sorted(n for n, c in Counter(names).items() if c > 1),
            "with_underscore": sum("_" in n for n in names),
            "first": names[:3],
        }
        vlm = getattr(pl_module, "vlm", None)
        if vlm is not None:
            record["preprocessing"] = vlm.preprocessing
            record["mean"], record["std"] = vlm.mean.flatten().tolist(), vlm.std.flatten().tolist()
            record["activations"] = sorted(
                {type(m).__name__ for m in vlm.model.modules() if type(m).__name__ in ("QuickGELU", "GELU")}
            )
            record["context_length"] = int(vlm.model.context_length)
            real_encode = vlm.encode_image

            def encode(images: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
                self.record["encoded"].append([len(images), *images.shape[-2:]])
                return real_encode(images, *args, **kwargs)

            vlm.encode_image = encode
        else:
            record["preprocessing"] = pl_module.preprocessing
        record["episodic"] = [
            {
                "method": type(c).__name__,
                "n_views": c.n_views,
                "views": c.views,
                "images_per_step": c.images_per_step,
                "grad_scaler": c.grad_scaler is not None,
            }
            for c in trainer.callbacks
            if isinstance(c, EpisodicTTA)
        ]
        for module in (tpt_methods, sts_methods, views_methods):
            self._spy(module, "select_confident", "selected", lambda args, out: [args[0].shape[1], out.shape[1]])
        self._spy(difftpt_methods, "cosine_filter", "cosine_kept", lambda args, out: [args[0].shape[1], out.shape[1]])

    def on_predict_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self.record["batches"].append(
            {
                "image": list(batch["image"].shape),
                "original": [list(o.shape) for o in batch.get("original", [])],
                "original_dtype": str(batch["original"][0].dtype) if batch.get("original") else None,
            }
        )

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.path.write_text(json.dumps(self.record, indent=1))
