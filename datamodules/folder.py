"""Images on disk in the folder-per-class layout (``root/<class folder>/<image>``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytorch_lightning as pl
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.transforms import v2
from typing_extensions import override

from tta.datamodules.streams import check_stream, stream_order
from tta.models.vlm import check_class_names

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm")


def _images_in(folder: Path, extensions: Sequence[str]) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in extensions)


def scan_class_folders(root: Path, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> list[tuple[str, list[Path]]]:
    """``[(folder name, image paths)]`` sorted by folder name, or an error that says how to fix the layout."""
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {root} does not exist: set data.root to a folder holding "
                                "one subfolder of images per class")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise FileNotFoundError(f"data folder {root} has no class subfolders: expected root/<class>/<image>")
    classes = [(f.name, _images_in(f, extensions)) for f in folders]
    if all(not images for _, images in classes):
        nested = [f for f in folders if any(p.is_dir() for p in f.iterdir())]
        if len(folders) == 1 and nested:
            raise FileNotFoundError(f"data folder {root} looks like the parent of the class folders: "
                                    f"set data.root to {folders[0]}")
        raise FileNotFoundError(f"no images ({', '.join(extensions)}) in the class folders of {root}")
    empty = [name for name, images in classes if not images]
    if empty:
        raise FileNotFoundError(f"class folders without images in {root}: {empty[:10]}"
                                f"{' ...' if len(empty) > 10 else ''}; remove them or add their images")
    return classes


class ImageFolderDataset(Dataset):
    def __init__(self, samples: list[tuple[Path, int]], domain: str, image_size: int) -> None:
        self.samples, self.domain = samples, domain
        self.transform = v2.Compose([
            v2.PILToTensor(),
            v2.Resize(image_size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop(image_size),
            v2.ToDtype(torch.float32, scale=True),
        ])

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        path, label = self.samples[i]
        try:
            with Image.open(path) as image:
                pixels = self.transform(image.convert("RGB"))
        except (UnidentifiedImageError, OSError) as error:
            raise ValueError(f"cannot decode image {path}: {error}; remove or replace the file") from error
        return {"image": pixels.clamp(0, 1), "label": torch.tensor(label), "index": torch.tensor(i),
                "domain": self.domain}


class ImageFolderDataModule(pl.LightningDataModule):
    """One domain of images in ``root/<class folder>/<image>``.

    Classes are the folders in sorted order; ``class_names`` (same order, same count) gives
    them readable names for the text prompts, otherwise the folder names are used with
    underscores as spaces. Images are resized (shorter side) and centre-cropped to
    ``image_size``, RGB, in [0, 1]. ``stream`` orders the samples (see
    ``tta.datamodules.streams``); the default "iid" shuffles them, since folder order is
    sorted by class, the worst case for batch-level methods.
    """

    def __init__(self, root: str | Path, class_names: Sequence[str] | None = None, domain: str | None = None,
                 image_size: int = 224, batch_size: int = 64, num_workers: int = 0,
                 extensions: Sequence[str] = IMAGE_EXTENSIONS, stream: str = "iid", dirichlet_alpha: float = 0.1,
                 stream_seed: int = 0) -> None:
        super().__init__()
        self.root = Path(root).expanduser()
        self.extensions = tuple(e.lower() for e in extensions)
        classes = scan_class_folders(self.root, self.extensions)  # fails fast, before any model loads
        if class_names is None:
            class_names = [name.replace("_", " ") for name, _ in classes]
        elif len(class_names) != len(classes):
            raise ValueError(f"{len(class_names)} class names for {len(classes)} class folders in {self.root}: "
                             "give one name per folder, in sorted folder order")
        self.class_names = check_class_names(class_names)
        self.name = domain or self.root.name
        self.domains = [self.name]
        self.image_size, self.batch_size, self.num_workers = int(image_size), int(batch_size), int(num_workers)
        samples = [(path, label) for label, (_, images) in enumerate(classes) for path in images]
        self.dataset = ImageFolderDataset(samples, self.name, self.image_size)
        check_stream(stream, dirichlet_alpha)
        self.stream, self.dirichlet_alpha, self.stream_seed = stream, float(dirichlet_alpha), int(stream_seed)
        labels = torch.tensor([label for _, label in samples])
        self.order = stream_order(labels, stream, self.stream_seed, self.dirichlet_alpha, self.batch_size)

    @override
    def predict_dataloader(self) -> DataLoader:
        return DataLoader(Subset(self.dataset, self.order.tolist()), batch_size=self.batch_size, shuffle=False,
                          num_workers=self.num_workers)
