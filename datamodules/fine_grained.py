"""The ten fine-grained data sets of the cross-dataset protocol, read from the split-file
layout that CoOp introduced and TPT, STS and most prompt-learning work use.

Each data set lives in its own folder (``data.root``) holding an image folder and a split
file: a JSON ``{"train": [...], "val": [...], "test": [...]}`` whose entries are
``[image path relative to the image folder, label, class name]``. FGVC-Aircraft has no JSON:
its split is ``images_variant_<split>.txt`` (lines ``<image id> <variant>``, images in
``images/<image id>.jpg``). Class names (in label order) come from
``tta/data/fine_grained.json`` with ``_`` replaced by a space, as the reference prompts them
("apple_pie" -> "a photo of a apple pie.").

======================  ================  ========================  ===================================
``dataset``             usual folder      image folder              split file
======================  ================  ========================  ===================================
caltech101              caltech-101       101_ObjectCategories      split_zhou_Caltech101.json
dtd                     dtd               images                    split_zhou_DescribableTextures.json
eurosat                 eurosat           2750                      split_zhou_EuroSAT.json
aircraft                fgvc_aircraft     images                    images_variant_<split>.txt
flower102               oxford_flowers    jpg                       split_zhou_OxfordFlowers.json
food101                 food-101          images                    split_zhou_Food101.json
pets                    oxford_pets       images                    split_zhou_OxfordPets.json
cars                    stanford_cars     (the folder itself)       split_zhou_StanfordCars.json
sun397                  sun397            SUN397                    split_zhou_SUN397.json
ucf101                  ucf101            UCF-101-midframes         split_zhou_UCF101.json
======================  ================  ========================  ===================================
"""

from __future__ import annotations

import json
from functools import cache
from importlib.resources import files
from pathlib import Path

from tta.datamodules.folder import ImageFilesDataModule, Sample
from tta.datamodules.preprocess import Preprocess

#: dataset -> (usual folder name, image folder inside it, split file inside it)
DATASETS = {
    "caltech101": ("caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json"),
    "dtd": ("dtd", "images", "split_zhou_DescribableTextures.json"),
    "eurosat": ("eurosat", "2750", "split_zhou_EuroSAT.json"),
    "aircraft": ("fgvc_aircraft", "images", "images_variant_{split}.txt"),
    "flower102": ("oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json"),
    "food101": ("food-101", "images", "split_zhou_Food101.json"),
    "pets": ("oxford_pets", "images", "split_zhou_OxfordPets.json"),
    "cars": ("stanford_cars", "", "split_zhou_StanfordCars.json"),
    "sun397": ("sun397", "SUN397", "split_zhou_SUN397.json"),
    "ucf101": ("ucf101", "UCF-101-midframes", "split_zhou_UCF101.json"),
}
SPLITS = ("train", "val", "test")


@cache
def _listed_names(dataset: str) -> list[str]:
    """The class names of ``dataset`` in label order, as ``tta/data/fine_grained.json`` lists them."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown fine-grained data set {dataset!r}: choose from {list(DATASETS)}")
    return json.loads(files("tta.data").joinpath("fine_grained.json").read_text())[dataset]


def fine_grained_class_names(dataset: str) -> list[str]:
    """The class names of ``dataset`` in label order, as the prompts use them: ``_`` replaced by a
    space (TPT's reference does the same; 349 names of food101, pets, sun397, caltech101 and
    ucf101 have underscores)."""
    return [name.replace("_", " ") for name in _listed_names(dataset)]


def read_split(root: Path, dataset: str, split: str, domain: str) -> list[Sample]:
    """The samples of one split of ``dataset`` in ``root``, checked against its class list."""
    folder, image_dir, split_name = DATASETS[dataset]
    split_file = root / split_name.format(split=split)
    if not split_file.is_file():
        hint = (
            f"set data.root to {root / folder}"
            if (root / folder / split_file.name).is_file()
            else f"data.root must be the {dataset} folder holding {image_dir or 'the images'} and {split_file.name}"
        )
        raise FileNotFoundError(f"split file {split_file} not found: {hint}")
    names = _listed_names(dataset)
    images = root / image_dir
    if dataset == "aircraft":
        label_of = {name: label for label, name in enumerate(names)}
        entries = []
        for line in split_file.read_text().splitlines():
            if line.strip():
                image_id, variant = line.strip().split(" ", 1)
                if variant not in label_of:
                    raise ValueError(
                        f"unknown aircraft variant {variant!r} in {split_file}: not one of the "
                        f"{len(names)} FGVC-Aircraft variants; is this the right split file?"
                    )
                entries.append((f"{image_id}.jpg", label_of[variant]))
    else:
        table = json.loads(split_file.read_text())
        if split not in table:
            raise ValueError(
                f"split file {split_file} has no {split!r} list (it has {list(table)}): set data.split "
                f"to one of {list(SPLITS)}"
            )
        entries = [(str(entry[0]), int(entry[1])) for entry in table[split]]
    labels = {label for _, label in entries}
    if not entries or min(labels) < 0 or max(labels) >= len(names) or len(labels) != len(names):
        raise ValueError(
            f"the {split} split of {split_file} has labels {min(labels, default=None)}.."
            f"{max(labels, default=None)} over {len(labels)} classes but {dataset} has {len(names)} "
            "classes: is this the split file of the right data set?"
        )
    missing = [path for path, _ in entries if not (images / path).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} images of the {split} split of {split_file} are not under "
            f"{images} (e.g. {missing[0]}): extract the images into {images}"
        )
    return [(images / path, label, domain) for path, label in entries]


class FineGrainedDataModule(ImageFilesDataModule):
    """One of the ten fine-grained sets of the cross-dataset protocol, from its split file.

    ``root`` is the data set's own folder (see the table in the module doc); ``split`` is
    "test" for test-time adaptation. Labels follow the split file; class names are the
    package's for ``dataset`` (``_`` as a space). The domain and ``name`` are ``dataset``. Images are
    resized to ``image_size`` as the model's preprocessing says (``resize_mode``,
    ``interpolation``); ``stream`` orders them; images that fail to decode are skipped and
    counted (``skipped_images``).
    """

    #: ``dataset`` (the data set's name) is kept as ``dataset_name``: ``dataset`` is the prediction set.
    argument_attributes = {"dataset": "dataset_name"}

    def __init__(
        self,
        root: str | Path,
        dataset: str,
        split: str = "test",
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
        class_names = fine_grained_class_names(dataset)
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}: set data.split to one of {list(SPLITS)}")
        self.root, self.dataset_name, self.split = Path(root).expanduser(), dataset, split
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"data folder {self.root} does not exist: set data.root to the {dataset} folder "
                f"({DATASETS[dataset][0]}/ in the usual layout)"
            )
        samples = read_split(self.root, dataset, split, dataset)
        super().__init__(
            samples,
            class_names,
            [dataset],
            dataset,
            Preprocess(image_size, resize_mode, interpolation),
            batch_size,
            num_workers,
            stream,
            dirichlet_alpha,
            stream_seed,
            on_bad_image,
        )
