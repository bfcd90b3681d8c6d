"""LightningDataModules for prediction-time adaptation.

The batch contract: every ``predict_dataloader`` yields dicts

- ``image``: float tensor ``B x 3 x H x W`` in [0, 1], RGB, **not normalised** (the model
  wrapper applies its own mean/std; augmentations work on raw pixels), at ``image_size``,
  resized as the model's preprocessing says (``resize_mode``, ``interpolation``: see
  ``tta.datamodules.preprocess``);
- ``original``: list of ``B`` uint8 tensors ``3 x H_i x W_i``, the images as decoded (sizes
  differ), from which view-based methods crop their views (``tta.augment.make_views``);
- ``label``: long tensor ``B``, the class index into ``class_names`` (``-1`` if unknown);
- ``index``: long tensor ``B``, the sample's index in the datamodule's prediction set
  (unique across domains, stable across runs with the same settings);
- ``domain``: list of ``B`` strings, the domain each sample comes from.

Each datamodule exposes ``class_names`` (list of str), ``domains`` (list of str) and ``name``.
The file-based ones (every one but the offline world) leave out images that fail to decode
and add ``skipped_images`` (int: how many of the batch were left out) to each batch, the
image-file ones also ``skipped_paths`` (their files); with ``on_bad_image="error"`` the
first such image stops the run instead.

Every datamodule here reads its prediction set in a stream order through
``streams.StreamDataModule``: under DDP the stream's batches are dealt whole to the ranks
(batch ``g`` to rank ``g % world_size``), and a resumed run starts after its finished batches.

Compositional benchmarks (k x k groups, 1 x k multiple choice) have their own group contract:
see ``tta.datamodules.compositional``.

Search episodes (``WorldSearchDataModule``, ``EpisodeFolderDataModule``) have their own
contract, one batch item per episode: see ``tta.datamodules.search``.
"""

from tta.datamodules.compositional import (
    GroupDataModule,
    MMVPVLMDataModule,
    SugarCrepeDataModule,
    WhatsUpDataModule,
    WinogroundDataModule,
    WorldGroupsDataModule,
)
from tta.datamodules.corrupted import CIFAR10CDataModule, ImageNetCDataModule
from tta.datamodules.fine_grained import FineGrainedDataModule
from tta.datamodules.folder import ImageFilesDataModule, ImageFolderDataModule
from tta.datamodules.imagenet import ImageNetDataModule, ImageNetV2DataModule
from tta.datamodules.search import EpisodeFolderDataModule, WorldSearchDataModule
from tta.datamodules.world import WorldDataModule

__all__ = [
    "CIFAR10CDataModule",
    "EpisodeFolderDataModule",
    "FineGrainedDataModule",
    "GroupDataModule",
    "ImageFilesDataModule",
    "ImageFolderDataModule",
    "ImageNetCDataModule",
    "ImageNetDataModule",
    "ImageNetV2DataModule",
    "MMVPVLMDataModule",
    "SugarCrepeDataModule",
    "WhatsUpDataModule",
    "WinogroundDataModule",
    "WorldDataModule",
    "WorldGroupsDataModule",
    "WorldSearchDataModule",
]
