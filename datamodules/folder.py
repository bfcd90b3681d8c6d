"""Images on disk in the folder-per-class layout (``root/<class folder>/<image>``), and the
shared pieces of every file-based datamodule: folder scanning, a dataset of image files that
skips (and counts, and names) images that fail to decode, and :class:`ImageFilesDataModule`,
the base that turns a list of ``(path, label, domain)`` samples into batches of the contract
in a stream order."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from PIL import UnidentifiedImageError
from torch.utils.data import Dataset
from typing_extensions import override

from tta.datamodules.preprocess import (
    ORIGINAL,
    Preprocess,
    UnsupportedImageError,
    classification_sample,
    collate_with_originals,
    decode,
)
from tta.datamodules.streams import StreamDataModule, check_loader, check_stream, order_within_domains
from tta.models.vlm import check_class_names, misplaced_class_name

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm")

#: One sample of a file-based data set: image path, label (index into class_names), domain.
Sample = tuple[Path, int, str]
#: What a file-based datamodule does with an image that fails to decode (``on_bad_image``).
BAD_IMAGE_CHOICES = ("skip", "error")
#: What decoding a broken or refused image raises (Pillow's errors; ValueError includes UnsupportedImageError).
DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError)


def _images_in(folder: Path, extensions: Sequence[str]) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in extensions)


def scan_class_folders(
    root: Path, extensions: Sequence[str] = IMAGE_EXTENSIONS, setting: str = "data.root"
) -> list[tuple[str, list[Path]]]:
    """``[(folder name, image paths)]`` sorted by folder name, or an error that says how to fix
    the layout (``setting`` names the config value to change)."""
    if not root.is_dir():
        raise FileNotFoundError(
            f"data folder {root} does not exist: set {setting} to a folder holding one subfolder of images per class"
        )
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise FileNotFoundError(f"data folder {root} has no class subfolders: expected root/<class>/<image>")
    classes = [(f.name, _images_in(f, extensions)) for f in folders]
    if all(not images for _, images in classes):
        nested = [f for f in folders if any(p.is_dir() for p in f.iterdir())]
        if len(folders) == 1 and nested:
            raise FileNotFoundError(
                f"data folder {root} looks like the parent of the class folders: set {setting} to {folders[0]}"
            )
        raise FileNotFoundError(f"no images ({', '.join(extensions)}) in the class folders of {root}")
    empty = [name for name, images in classes if not images]
    if empty:
        raise FileNotFoundError(
            f"class folders without images in {root}: {empty[:10]}"
            f"{' ...' if len(empty) > 10 else ''}; remove them or add their images"
        )
    return classes


class ImageFilesDataset(Dataset):
    """Samples of the batch contract from image files; ``index`` is the sample's position,
    ``original`` the image as decoded and ``image`` its ``preprocess``-ed model input.

    An image that fails to decode, or that :func:`~tta.datamodules.preprocess.decode` refuses
    (:class:`~tta.datamodules.preprocess.UnsupportedImageError`), gives ``{"undecodable": its
    path}``; :func:`collate_skipping` leaves it out of the batch and names it.
    """

    def __init__(self, samples: Sequence[Sample], preprocess: Preprocess) -> None:
        self.samples = list(samples)
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        path, label, domain = self.samples[i]
        try:
            original = decode(path)
        except DECODE_ERRORS:
            return {"undecodable": str(path)}
        return classification_sample(original, self.preprocess, label, i, domain)


def _refusal(path: str | Path) -> str | None:
    """Why :func:`~tta.datamodules.preprocess.decode` refuses the image at ``path`` (its mode, and
    the fix), or None where it decodes or is merely broken. Decoded again to find out: a sample
    carries only its path through the loader's collate, into the batch's ``skipped_paths``."""
    try:
        decode(path)
    except UnsupportedImageError as error:
        return str(error)
    except DECODE_ERRORS:
        pass
    return None


def collate_skipping(samples: list[dict], image_size: int) -> dict[str, Any]:
    """The default collate over the samples that decoded, plus ``skipped_images`` (how many of
    the batch did not) and ``skipped_paths`` (their files). A batch whose every image failed is
    an empty batch of the contract."""
    kept = [s for s in samples if "undecodable" not in s]
    batch = (
        collate_with_originals(kept)
        if kept
        else {
            "image": torch.zeros(0, 3, image_size, image_size),
            ORIGINAL: [],
            "label": torch.zeros(0, dtype=torch.long),
            "index": torch.zeros(0, dtype=torch.long),
            "domain": [],
        }
    )
    batch["skipped_images"] = len(samples) - len(kept)
    batch["skipped_paths"] = [s["undecodable"] for s in samples if "undecodable" in s]
    return batch


class ImageFilesDataModule(StreamDataModule):
    """Base of the file-based datamodules: ``samples`` (path, label, domain) in the stream order.

    ``stream`` orders the samples within each domain, domains following each other in
    ``domains`` order (see ``tta.datamodules.streams``); samples keep their ``index``. Images
    that fail to decode are left out of their batch and counted in its ``skipped_images``, their
    files in ``skipped_paths`` (the prediction writer sums them into ``metrics.json`` and names
    the first at the end), or, with ``on_bad_image="error"``, stop the run at the first one.
    Images reach the model as ``preprocess`` makes them (``tta.datamodules.preprocess``), with the
    original beside them.
    """

    #: The samples are in the run key as the fingerprint of their files (``inputs.data``), not one by one.
    argument_attributes = {"samples": None}

    def __init__(
        self,
        samples: Sequence[Sample],
        class_names: Sequence[str],
        domains: Sequence[str],
        name: str,
        preprocess: Preprocess,
        batch_size: int,
        num_workers: int,
        stream: str,
        dirichlet_alpha: float,
        stream_seed: int,
        on_bad_image: str = "skip",
    ) -> None:
        super().__init__()
        if on_bad_image not in BAD_IMAGE_CHOICES:
            raise ValueError(f"on_bad_image must be one of {BAD_IMAGE_CHOICES}, got {on_bad_image!r}")
        self.on_bad_image = on_bad_image
        check_loader(batch_size, num_workers, stream_seed)
        self.class_names = check_class_names(class_names)
        self.domains, self.name = list(domains), name
        self.preprocess, self.image_size = preprocess, int(preprocess.size)
        self.batch_size, self.num_workers = int(batch_size), int(num_workers)
        check_stream(stream, dirichlet_alpha)
        self.stream, self.dirichlet_alpha, self.stream_seed = stream, float(dirichlet_alpha), int(stream_seed)
        self.dataset = ImageFilesDataset(samples, preprocess)
        labels = torch.tensor([label for _, label, _ in self.dataset.samples], dtype=torch.long)
        domain_of = [domain for _, _, domain in self.dataset.samples]
        self.order = order_within_domains(
            labels, domain_of, self.domains, stream, self.stream_seed, self.dirichlet_alpha, self.batch_size
        )

    @override
    def collate_fn(self) -> Callable[[list[dict]], dict[str, Any]]:
        return partial(collate_skipping, image_size=self.image_size)

    @override
    def input_files(self) -> list[Path]:
        return [path for path, _, _ in self.dataset.samples]

    @override
    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # here, in the main process, rather than in the loader: a loader worker's error comes
        # back wrapped in its traceback
        if self.on_bad_image == "error" and batch["skipped_paths"]:
            path = batch["skipped_paths"][0]
            why = _refusal(path) or f"cannot decode the image {path}: replace or remove the file"
            raise ValueError(
                f"{why}, or set data.on_bad_image=skip to leave undecodable images out (they are listed at the end)"
            )
        return batch


class ImageFolderDataModule(ImageFilesDataModule):
    """One domain of images in ``root/<class folder>/<image>``.

    Classes are the folders in sorted order; ``class_names`` (same order, same count) gives
    them readable names for the text prompts, otherwise the folder names are used with
    underscores as spaces. Images are resized to ``image_size`` as the model's preprocessing says
    (``resize_mode``, ``interpolation``: see ``tta.datamodules.preprocess``), RGB, in [0, 1].
    ``stream`` orders the samples (see ``tta.datamodules.streams``); the default "iid" shuffles
    them, since folder order is
    sorted by class, the worst case for batch-level methods. Images that fail to decode are
    skipped and counted (``skipped_images``), or stop the run (``on_bad_image="error"``).

    ``class_names`` that are the folder names in another order would silently swap labels, so
    they are refused, with the folder order in the message.
    """

    def __init__(
        self,
        root: str | Path,
        class_names: Sequence[str] | None = None,
        domain: str | None = None,
        image_size: int = 224,
        resize_mode: str = "shortest",
        interpolation: str = "bicubic",
        batch_size: int = 64,
        num_workers: int = 0,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        stream: str = "iid",
        dirichlet_alpha: float = 0.1,
        stream_seed: int = 0,
        on_bad_image: str = "skip",
    ) -> None:
        self.root, self.domain = Path(root).expanduser(), domain
        self.extensions = tuple(e.lower() for e in extensions)
        classes = scan_class_folders(self.root, self.extensions)  # fails fast, before any model loads
        folder_names = [name.replace("_", " ") for name, _ in classes]
        if class_names is None:
            class_names = folder_names
        elif len(class_names) != len(classes):
            raise ValueError(
                f"{len(class_names)} class names for {len(classes)} class folders in {self.root}: "
                "give one name per folder, in sorted folder order"
            )
        elif (misplaced := misplaced_class_name(class_names, folder_names)) is not None:
            i, j = misplaced
            folders = [n for n, _ in classes]
            raise ValueError(
                f"data.class_names {list(class_names)} are the class folders of {self.root} in another order "
                f"(compared as the prompts tell names apart, case, spaces and underscores aside: {class_names[i]!r} "
                f"is given for folder {folders[i]!r} but names {folders[j]!r}), which would swap their labels: "
                f"labels follow the sorted folders {folders}; give the names in that order, or leave "
                "data.class_names unset"
            )
        name = domain or self.root.name
        samples = [(path, label, name) for label, (_, images) in enumerate(classes) for path in images]
        super().__init__(
            samples,
            class_names,
            [name],
            name,
            Preprocess(image_size, resize_mode, interpolation),
            batch_size,
            num_workers,
            stream,
            dirichlet_alpha,
            stream_seed,
            on_bad_image,
        )
