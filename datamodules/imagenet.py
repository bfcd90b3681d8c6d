"""ImageNet and its domain-shift variants, read from the folder layouts they are downloaded in.

- ImageNet validation, ImageNet-Sketch: ``root/<WordNet id>/<image>``, all 1000 classes;
- ImageNet-A, ImageNet-R: ``root/<WordNet id>/<image>``, 200 of the 1000 classes; labels and
  predictions are over those 200 only (``class_names`` has 200 entries, in ImageNet order);
- ImageNet-V2: ``root/<k>/<image>`` where folder ``k`` (0..999) holds label ``k``: folder names
  are read as integers, never sorted as strings ("10" sorts before "2").

Class names are CLIP's cleaned ImageNet names (``tta/data/imagenet.json``), as CLIP and TPT
prompt with them (``class_list="clip"``, the default). Two of them occur twice ("missile" for
n03773504 and n04008634; "sunglasses" for n04355933 and n04356056), so those two pairs of
classes get the same text features, as in the reference; a warning says so. ``class_list="unique"``
gives the second occurrence of each a qualifier from its WordNet synset
(:data:`DUPLICATE_RENAMES`: n04008634 "projectile, missile" -> "projectile missile", n04356056
"sunglasses, dark glasses" -> "dark glasses"); the other 998 names are the same in both lists.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import cache
from importlib.resources import files
from pathlib import Path
from typing import Any

from tta.datamodules.folder import IMAGE_EXTENSIONS, ImageFilesDataModule, Sample, scan_class_folders
from tta.datamodules.preprocess import Preprocess

#: The second occurrence of each duplicated CLIP name, renamed by WordNet id (see the module doc).
DUPLICATE_RENAMES = {"n04008634": "projectile missile", "n04356056": "dark glasses"}
#: ``class_list`` values: CLIP's list as is (the reference's), or with the duplicates renamed.
CLASS_LISTS = ("clip", "unique")

#: variant -> (name of its subset key in imagenet.json or None for all 1000, readable name)
VARIANTS = {
    "imagenet": (None, "ImageNet validation"),
    "imagenet_sketch": (None, "ImageNet-Sketch"),
    "imagenet_a": ("imagenet_a_indices", "ImageNet-A"),
    "imagenet_r": ("imagenet_r_indices", "ImageNet-R"),
}


@cache
def imagenet_metadata() -> dict[str, Any]:
    """``tta/data/imagenet.json``: WordNet ids, CLIP's class names, the -A and -R subsets."""
    return json.loads(files("tta.data").joinpath("imagenet.json").read_text())


def imagenet_classes(variant: str = "imagenet", class_list: str = "clip") -> tuple[list[str], list[str]]:
    """``(WordNet ids, class names)`` of a variant's classes, in ImageNet label order; ``class_list``
    "clip" (CLIP's names, two duplicates included) or "unique" (see the module doc)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown ImageNet variant {variant!r}: choose from {list(VARIANTS)}")
    if class_list not in CLASS_LISTS:
        raise ValueError(f"unknown class_list {class_list!r}: set data.class_list to one of {list(CLASS_LISTS)}")
    meta = imagenet_metadata()
    names = meta["classnames"]
    if class_list == "unique":
        names = [DUPLICATE_RENAMES.get(wnid, name) for wnid, name in zip(meta["wnids"], names)]
    subset = VARIANTS[variant][0]
    indices = meta[subset] if subset else range(len(meta["wnids"]))
    return [meta["wnids"][i] for i in indices], [names[i] for i in indices]


def wnid_samples(
    root: Path, variant: str, domain: str, extensions: Sequence[str] = IMAGE_EXTENSIONS, setting: str = "data.root"
) -> list[Sample]:
    """Samples of ``root/<WordNet id>/<image>`` labelled by the variant's class order; the
    folders must be exactly the variant's classes."""
    wnids, _ = imagenet_classes(variant)
    label_of = {wnid: label for label, wnid in enumerate(wnids)}
    classes = scan_class_folders(root, extensions, setting)
    readable = VARIANTS[variant][1]
    all_wnids = set(imagenet_metadata()["wnids"])
    unknown = [name for name, _ in classes if name not in all_wnids]
    if unknown:
        raise ValueError(
            f"folders of {root} that are not ImageNet WordNet ids: {unknown[:5]}"
            f"{' ...' if len(unknown) > 5 else ''}; {readable} expects root/<WordNet id>/<image> "
            "(e.g. n01440764): check that data.root is the folder of the class folders"
        )
    foreign = [name for name, _ in classes if name not in label_of]
    if foreign:
        raise ValueError(
            f"{len(foreign)} folders of {root} are ImageNet classes outside the {len(wnids)} of "
            f"{readable} (e.g. {foreign[0]}): is this the right variant?"
        )
    if len(classes) != len(wnids):
        missing = sorted(set(wnids) - {name for name, _ in classes})
        raise ValueError(
            f"{root} has {len(classes)} class folders but {readable} has {len(wnids)} classes "
            f"(missing e.g. {missing[:3]}): point data.root at the complete, extracted data set"
        )
    return [(path, label_of[name], domain) for name, images in classes for path in images]


def integer_samples(
    root: Path, n_classes: int, domain: str, extensions: Sequence[str] = IMAGE_EXTENSIONS, setting: str = "data.root"
) -> list[Sample]:
    """Samples of ``root/<k>/<image>`` where folder ``k`` holds label ``k`` (integer names, any order)."""
    classes = scan_class_folders(root, extensions, setting)
    bad = [name for name, _ in classes if not name.isdigit() or not 0 <= int(name) < n_classes]
    if bad:
        raise ValueError(
            f"folders of {root} that are not labels 0..{n_classes - 1}: {bad[:5]}; ImageNet-V2 "
            "expects root/<integer label>/<image>: check that data.root is the folder of the label folders"
        )
    if len(classes) != n_classes:
        missing = sorted(set(range(n_classes)) - {int(name) for name, _ in classes})
        raise ValueError(
            f"{root} has {len(classes)} label folders but ImageNet-V2 has {n_classes} classes "
            f"(missing e.g. {missing[:3]}): point data.root at the complete, extracted data set"
        )
    return [(path, int(name), domain) for name, images in classes for path in images]


class ImageNetDataModule(ImageFilesDataModule):
    """ImageNet validation or a variant in the WordNet-id folder layout (``root/<wnid>/<image>``).

    ``variant``: "imagenet", "imagenet_sketch" (1000 classes), "imagenet_a" or "imagenet_r"
    (their 200 classes: labels index ``class_names``, which has the 200 names in ImageNet
    order). ``class_list``: "clip" (the reference's names) or "unique" (see the module doc). The
    domain and ``name`` are the variant. Images are resized to ``image_size`` as the model's
    preprocessing says (``resize_mode``, ``interpolation``); ``stream`` orders them
    (``tta.datamodules.streams``); images that fail to decode are skipped and counted
    (``skipped_images``).
    """

    def __init__(
        self,
        root: str | Path,
        variant: str = "imagenet",
        class_list: str = "clip",
        image_size: int = 224,
        resize_mode: str = "shortest",
        interpolation: str = "bicubic",
        batch_size: int = 64,
        num_workers: int = 0,
        stream: str = "iid",
        dirichlet_alpha: float = 0.1,
        stream_seed: int = 0,
        on_bad_image: str = "skip",
    ) -> None:
        _, class_names = imagenet_classes(variant, class_list)
        self.root, self.variant, self.class_list = Path(root).expanduser(), variant, class_list
        samples = wnid_samples(self.root, variant, variant)
        super().__init__(
            samples,
            class_names,
            [variant],
            variant,
            Preprocess(image_size, resize_mode, interpolation),
            batch_size,
            num_workers,
            stream,
            dirichlet_alpha,
            stream_seed,
            on_bad_image,
        )


class ImageNetV2DataModule(ImageFilesDataModule):
    """ImageNet-V2 (any of its three sets) in its download layout ``root/<label>/<image>``, the
    folder names being integer labels 0..999 (mapped as integers, not in string order);
    ``class_list`` and the preprocessing as for :class:`ImageNetDataModule`."""

    name = "imagenet_v2"

    def __init__(
        self,
        root: str | Path,
        class_list: str = "clip",
        image_size: int = 224,
        resize_mode: str = "shortest",
        interpolation: str = "bicubic",
        batch_size: int = 64,
        num_workers: int = 0,
        stream: str = "iid",
        dirichlet_alpha: float = 0.1,
        stream_seed: int = 0,
        on_bad_image: str = "skip",
    ) -> None:
        _, class_names = imagenet_classes("imagenet", class_list)
        self.root, self.class_list = Path(root).expanduser(), class_list
        samples = integer_samples(self.root, len(class_names), self.name)
        super().__init__(
            samples,
            class_names,
            [self.name],
            self.name,
            Preprocess(image_size, resize_mode, interpolation),
            batch_size,
            num_workers,
            stream,
            dirichlet_alpha,
            stream_seed,
            on_bad_image,
        )
