"""Corrupted data sets read from their pre-generated files: ImageNet-C
(``root/<corruption>/<severity>/<WordNet id>/<image>``) and CIFAR-10-C (``root/<corruption>.npy``
+ ``root/labels.npy``), the 15 corruptions x 5 severities of Hendrycks & Dietterich (2019).

Corruptions are not applied on the fly: the maintained library for them (``imagecorruptions``
1.1.2, the last release) calls scikit-image and SciPy APIs that current releases removed
(``multichannel=``, ``scipy.ndimage.interpolation``) and needs ``pkg_resources`` and OpenCV, so
it does not run with the numpy 2 stack this package uses. The pre-generated files are also what
published ImageNet-C numbers are measured on (their JPEG compression is part of the benchmark).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from typing_extensions import override

from tta.datamodules.folder import ImageFilesDataModule
from tta.datamodules.imagenet import imagenet_classes, wnid_samples
from tta.datamodules.preprocess import Preprocess, classification_sample, collate_with_originals
from tta.datamodules.streams import StreamDataModule, check_loader, order_within_domains

CORRUPTIONS = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "glass_blur",
    "motion_blur",
    "zoom_blur",
    "snow",
    "frost",
    "fog",
    "brightness",
    "contrast",
    "elastic_transform",
    "pixelate",
    "jpeg_compression",
)
#: The four extra corruptions of the official downloads (ImageNet-C's extra archive, CIFAR-10-C's
#: files): not in "all", which means the 15 of the benchmark.
EXTRA_CORRUPTIONS = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
SEVERITIES = (1, 2, 3, 4, 5)


def check_corruptions(
    corruptions: Sequence[str] | str, severities: Sequence[int], known: Sequence[str]
) -> tuple[list[str], list[int]]:
    """The corruptions ("all": the 15 of :data:`CORRUPTIONS`) and severities asked for, as
    lists, or a clear error."""
    names = (
        list(CORRUPTIONS)
        if corruptions == "all"
        else [corruptions]
        if isinstance(corruptions, str)
        else list(corruptions)
    )
    unknown = [c for c in names if c not in known]
    if unknown or not names:
        raise ValueError(
            f"unknown or no corruptions {unknown or names}: set data.corruptions to 'all' or some of {list(known)}"
        )
    levels = [int(s) for s in severities]
    if not levels or any(s not in SEVERITIES for s in levels):
        raise ValueError(f"data.severities must be a non-empty list of 1..5, got {list(severities)}")
    return names, levels


class ImageNetCDataModule(ImageFilesDataModule):
    """ImageNet-C: one domain ``<corruption>_<severity>`` per corruption and severity asked for.

    ``corruptions`` is "all" (the 15 of :data:`CORRUPTIONS`) or a list of them and of the four
    extra ones (:data:`EXTRA_CORRUPTIONS`, the official extra download); ``severities``
    a list of 1..5 (default [5], the usual TTA protocol). Each severity folder holds the 1000
    WordNet-id class folders. ``class_list`` as for ImageNet ("clip" or "unique"). Images are
    resized to ``image_size`` as the model's preprocessing says. ``stream`` orders the samples
    within each domain; images that fail to decode are skipped and counted (``skipped_images``).
    """

    name = "imagenet_c"

    def __init__(
        self,
        root: str | Path,
        corruptions: Sequence[str] | str = "all",
        severities: Sequence[int] = (5,),
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
        self.root, self.class_list = Path(root).expanduser(), class_list
        self.corruptions, self.severities = check_corruptions(corruptions, severities, CORRUPTIONS + EXTRA_CORRUPTIONS)
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"data folder {self.root} does not exist: set data.root to the ImageNet-C folder "
                "(root/<corruption>/<severity>/<WordNet id>/<image>)"
            )
        present = sorted(p.name for p in self.root.iterdir() if p.is_dir())
        missing = [c for c in self.corruptions if c not in present]
        if missing:
            nested = [p for p in present if (self.root / p / self.corruptions[0]).is_dir()]
            hint = (
                f"set data.root to {self.root / nested[0]}"
                if nested
                else f"it holds {present[:5]}; expected root/<corruption>/<severity>/<WordNet id>/<image>"
            )
            raise FileNotFoundError(f"corruption folders {missing[:3]} not in {self.root}: {hint}")
        samples, domains = [], []
        for corruption in self.corruptions:
            for severity in self.severities:
                domain = f"{corruption}_{severity}"
                folder = self.root / corruption / str(severity)
                samples += wnid_samples(folder, "imagenet", domain, setting="data.root")
                domains.append(domain)
        _, class_names = imagenet_classes("imagenet", class_list)
        super().__init__(
            samples,
            class_names,
            domains,
            self.name,
            Preprocess(image_size, resize_mode, interpolation),
            batch_size,
            num_workers,
            stream,
            dirichlet_alpha,
            stream_seed,
            on_bad_image,
        )


#: CIFAR-10's classes in label order.
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


class ArrayImageDataset(Dataset):
    """Samples of the batch contract from ``N x H x W x 3`` uint8 arrays (memory-mapped): ``original``
    the array's image, ``image`` its ``preprocess``-ed model input. ``rows`` are ``(array key, row,
    label, domain)``."""

    def __init__(
        self, arrays: dict[str, np.ndarray], rows: list[tuple[str, int, int, str]], preprocess: Preprocess
    ) -> None:
        self.arrays, self.rows, self.preprocess = arrays, rows, preprocess

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        key, row, label, domain = self.rows[i]
        # a copy: rows of a read-only memory map would make torch warn that the array is not writable
        original = torch.from_numpy(np.array(self.arrays[key][row])).permute(2, 0, 1).contiguous()
        return classification_sample(original, self.preprocess, label, i, domain)


class CIFAR10CDataModule(StreamDataModule):
    """CIFAR-10-C, pre-generated: ``root/<corruption>.npy`` (N x 32 x 32 x 3 uint8, the five
    severities one after the other, N/5 images each) and ``root/labels.npy``.

    One domain ``<corruption>_<severity>`` per corruption and severity asked for; classes are
    CIFAR-10's ten. Images are upsampled to ``image_size`` as the model's preprocessing says
    (``resize_mode``, ``interpolation``). ``stream`` orders the samples within each domain.
    """

    name = "cifar10_c"
    class_names = list(CIFAR10_CLASSES)

    def __init__(
        self,
        root: str | Path,
        corruptions: Sequence[str] | str = "all",
        severities: Sequence[int] = (5,),
        image_size: int = 224,
        resize_mode: str = "shortest",
        interpolation: str = "bicubic",
        batch_size: int = 64,
        num_workers: int = 0,
        stream: str = "iid",
        dirichlet_alpha: float = 0.1,
        stream_seed: int = 0,
    ) -> None:
        super().__init__()
        self.root = Path(root).expanduser()
        self.corruptions, self.severities = check_corruptions(corruptions, severities, CORRUPTIONS + EXTRA_CORRUPTIONS)
        check_loader(batch_size, num_workers, stream_seed)
        self.preprocess = Preprocess(image_size, resize_mode, interpolation)
        labels_path = self.root / "labels.npy"
        if not labels_path.is_file():
            nested = sorted(p for p in self.root.glob("*/labels.npy")) if self.root.is_dir() else []
            hint = (
                f"set data.root to {nested[0].parent}"
                if nested
                else "expected root/labels.npy and root/<corruption>.npy"
            )
            raise FileNotFoundError(f"no labels.npy in the CIFAR-10-C folder {self.root}: {hint}")
        labels = np.load(labels_path)
        if len(labels) % len(SEVERITIES) or labels.min() < 0 or labels.max() >= len(CIFAR10_CLASSES):
            raise ValueError(
                f"{labels_path} must hold 5 x n labels in 0..9, got {len(labels)} labels in "
                f"{labels.min()}..{labels.max()}"
            )
        per_severity = len(labels) // len(SEVERITIES)
        arrays, rows = {}, []
        self.domains = []
        for corruption in self.corruptions:
            path = self.root / f"{corruption}.npy"
            if not path.is_file():
                raise FileNotFoundError(
                    f"{path} is missing: download CIFAR-10-C into data.root, or drop {corruption} from data.corruptions"
                )
            arrays[corruption] = np.load(path, mmap_mode="r")
            if arrays[corruption].shape[0] != len(labels) or arrays[corruption].shape[-1] != 3:
                raise ValueError(
                    f"{path} has shape {arrays[corruption].shape}; expected {len(labels)} x H x W x 3 like labels.npy"
                )
            for severity in self.severities:
                domain = f"{corruption}_{severity}"
                start = (severity - 1) * per_severity
                rows += [(corruption, start + r, int(labels[start + r]), domain) for r in range(per_severity)]
                self.domains.append(domain)
        self.dataset = ArrayImageDataset(arrays, rows, self.preprocess)
        self.order = order_within_domains(
            torch.tensor([label for _, _, label, _ in rows]),
            [domain for _, _, _, domain in rows],
            self.domains,
            stream,
            int(stream_seed),
            float(dirichlet_alpha),
            int(batch_size),
        )
        self.image_size, self.batch_size, self.num_workers = int(image_size), int(batch_size), int(num_workers)
        self.stream, self.dirichlet_alpha, self.stream_seed = stream, float(dirichlet_alpha), int(stream_seed)

    @override
    def collate_fn(self) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
        return collate_with_originals

    @override
    def input_files(self) -> list[Path]:
        return [self.root / "labels.npy", *(self.root / f"{corruption}.npy" for corruption in self.corruptions)]
