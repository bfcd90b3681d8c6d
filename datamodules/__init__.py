"""LightningDataModules for prediction-time adaptation.

The batch contract: every ``predict_dataloader`` yields dicts

- ``image``: float tensor ``B x 3 x H x W`` in [0, 1], RGB, **not normalised** (the model
  wrapper applies its own mean/std; augmentations work on raw pixels), at ``image_size``;
- ``label``: long tensor ``B``, the class index into ``class_names`` (``-1`` if unknown);
- ``index``: long tensor ``B``, the sample's index in the datamodule's prediction set
  (unique across domains, stable across runs with the same settings);
- ``domain``: list of ``B`` strings, the domain each sample comes from.

Each datamodule exposes ``class_names`` (list of str), ``domains`` (list of str) and ``name``.
"""

from tta.datamodules.folder import ImageFolderDataModule
from tta.datamodules.world import WorldDataModule

__all__ = ["ImageFolderDataModule", "WorldDataModule"]
