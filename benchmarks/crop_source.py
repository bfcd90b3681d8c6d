"""A world datamodule whose batches' ``original`` is the model's input itself (the resized render),
so that view-based methods crop their views from the centre crop, as before issue 13: the
counterfactual that isolates what the crop source alone changes (``docs/benchmarks.md``).

    PYTHONPATH=benchmarks tta-predict tta=views data.render_size=128 data._target_=crop_source.CentreCropSource
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from typing_extensions import override

from tta.datamodules import WorldDataModule
from tta.datamodules.preprocess import collate_with_originals


def _centre_crop_as_original(samples: list[dict[str, Any]]) -> dict[str, Any]:
    batch = collate_with_originals(samples)
    batch["original"] = [(image * 255).round().to(torch.uint8) for image in batch["image"]]
    return batch


class CentreCropSource(WorldDataModule):
    """:class:`tta.datamodules.WorldDataModule` with ``original`` replaced by the model's input."""

    @override
    def collate_fn(self) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
        return _centre_crop_as_original
