"""Corrupted data sets read from their pre-generated folders: ImageNet-C
(``root/<corruption>/<severity>/<WordNet id>/<image>``), the 15 corruptions x 5 severities of
Hendrycks & Dietterich (2019).

Corruptions are not applied on the fly: the maintained library for them (``imagecorruptions``
1.1.2, the last release) calls scikit-image and SciPy APIs that current releases removed
(``multichannel=``, ``scipy.ndimage.interpolation``) and needs ``pkg_resources`` and OpenCV, so
it does not run with the numpy 2 stack this package uses. The pre-generated files are also what
published ImageNet-C numbers are measured on (their JPEG compression is part of the benchmark).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tta.datamodules.folder import ImageFilesDataModule
from tta.datamodules.imagenet import imagenet_classes, wnid_samples

CORRUPTIONS = (
    "gaussian_noise", "shot_noise", "impulse_noise",
    "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog", "brightness",
    "contrast", "elastic_transform", "pixelate", "jpeg_compression",
)
SEVERITIES = (1, 2, 3, 4, 5)


class ImageNetCDataModule(ImageFilesDataModule):
    """ImageNet-C: one domain ``<corruption>_<severity>`` per corruption and severity asked for.

    ``corruptions`` is "all" (the 15 of :data:`CORRUPTIONS`) or a list of them; ``severities``
    a list of 1..5 (default [5], the usual TTA protocol). Each severity folder holds the 1000
    WordNet-id class folders. ``stream`` orders the samples within each domain; images that fail
    to decode are skipped and counted (``skipped_images``).
    """

    name = "imagenet_c"

    def __init__(self, root: str | Path, corruptions: Sequence[str] | str = "all", severities: Sequence[int] = (5,),
                 image_size: int = 224, batch_size: int = 64, num_workers: int = 0, stream: str = "iid",
                 dirichlet_alpha: float = 0.1, stream_seed: int = 0) -> None:
        self.root = Path(root).expanduser()
        self.corruptions = (list(CORRUPTIONS) if corruptions == "all"
                            else [corruptions] if isinstance(corruptions, str) else list(corruptions))
        unknown = [c for c in self.corruptions if c not in CORRUPTIONS]
        if unknown or not self.corruptions:
            raise ValueError(f"unknown or no corruptions {unknown or self.corruptions}: set data.corruptions to 'all' "
                             f"or some of {list(CORRUPTIONS)}")
        self.severities = [int(s) for s in severities]
        if not self.severities or any(s not in SEVERITIES for s in self.severities):
            raise ValueError(f"data.severities must be a non-empty list of 1..5, got {list(severities)}")
        if not self.root.is_dir():
            raise FileNotFoundError(f"data folder {self.root} does not exist: set data.root to the ImageNet-C folder "
                                    "(root/<corruption>/<severity>/<WordNet id>/<image>)")
        present = sorted(p.name for p in self.root.iterdir() if p.is_dir())
        missing = [c for c in self.corruptions if c not in present]
        if missing:
            nested = [p for p in present if (self.root / p / self.corruptions[0]).is_dir()]
            hint = (f"set data.root to {self.root / nested[0]}" if nested else
                    f"it holds {present[:5]}; expected root/<corruption>/<severity>/<WordNet id>/<image>")
            raise FileNotFoundError(f"corruption folders {missing[:3]} not in {self.root}: {hint}")
        samples, domains = [], []
        for corruption in self.corruptions:
            for severity in self.severities:
                domain = f"{corruption}_{severity}"
                folder = self.root / corruption / str(severity)
                samples += wnid_samples(folder, "imagenet", domain, setting="data.root")
                domains.append(domain)
        _, class_names = imagenet_classes("imagenet")
        super().__init__(samples, class_names, domains, self.name, image_size, batch_size, num_workers, stream,
                         dirichlet_alpha, stream_seed)
