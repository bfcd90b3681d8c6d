"""The offline world as a datamodule: the clean domain and every shift, seeded."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import Dataset
from typing_extensions import override

from tta.datamodules.streams import StreamDataModule, check_stream, order_within_domains
from tta.world import CLASS_NAMES, DOMAINS, ORIGINAL_SIZE, check_domain, model_input, render_domain


class TensorDictDataset(Dataset):
    """Samples of the batch contract from pre-built tensors (images stored as uint8)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, domains: list[str]) -> None:
        self.images, self.labels, self.domains = images, labels, domains

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {
            "image": self.images[i].float() / 255,
            "label": self.labels[i],
            "index": torch.tensor(i),
            "domain": self.domains[i],
        }


class WorldDataModule(StreamDataModule):
    """Single-object scenes of the offline world, ``n_per_domain`` per domain.

    Every domain shows the same scenes (same ``seed``) through its shift, so differences
    between domains are the shift's alone. Scenes are rendered as originals of ``render_size``
    px (stored as uint8 like real images) and resized + centre-cropped to ``image_size``, as
    real images are (``tta.world.model_input``). The default ``seed`` is disjoint from the training seeds of
    the shipped model. ``stream`` orders each domain's samples (see ``tta.datamodules.streams``:
    "iid", "sorted" by label, or "dirichlet" class-imbalanced chunks of ``batch_size``).
    """

    name = "world"
    class_names = list(CLASS_NAMES)

    def __init__(
        self,
        domains: Sequence[str] | str = "all",
        severity: int = 3,
        n_per_domain: int = 500,
        seed: int = 10_000,
        image_size: int = 64,
        render_size: int = ORIGINAL_SIZE,
        batch_size: int = 64,
        num_workers: int = 0,
        stream: str = "iid",
        dirichlet_alpha: float = 0.1,
        stream_seed: int = 0,
    ) -> None:
        super().__init__()
        self.domains = list(DOMAINS) if domains == "all" else [domains] if isinstance(domains, str) else list(domains)
        if not self.domains:
            raise ValueError(f"domains is empty: give 'all' or some of {list(DOMAINS)}")
        for domain in self.domains:
            check_domain(domain)
        if len(set(self.domains)) != len(self.domains):
            raise ValueError(f"domains {self.domains} repeat a domain: list each once")
        if not 1 <= int(severity) <= 5:
            raise ValueError(f"severity must be in 1..5, got {severity}")
        if n_per_domain < 1 or batch_size < 1:
            raise ValueError(f"n_per_domain and batch_size must be positive, got {n_per_domain}, {batch_size}")
        self.severity, self.n_per_domain, self.seed = int(severity), int(n_per_domain), int(seed)
        self.image_size, self.batch_size, self.num_workers = int(image_size), int(batch_size), int(num_workers)
        self.render_size = int(render_size)
        check_stream(stream, dirichlet_alpha)
        self.stream, self.dirichlet_alpha, self.stream_seed = stream, float(dirichlet_alpha), int(stream_seed)
        self.dataset: TensorDictDataset | None = None
        self.order: torch.Tensor | None = None

    @override
    def setup(self, stage: str) -> None:
        if self.dataset is not None:
            return
        images, labels, domains = [], [], []
        for domain in self.domains:
            scenes = render_domain(domain, self.severity, self.n_per_domain, self.seed, self.render_size)
            originals = (scenes.images * 255).round().to(torch.uint8)
            images.append((model_input(originals, self.image_size) * 255).round().to(torch.uint8))
            labels.append(scenes.labels)
            domains += [domain] * self.n_per_domain
        self.dataset = TensorDictDataset(torch.cat(images), torch.cat(labels), domains)
        self.order = order_within_domains(
            self.dataset.labels,
            domains,
            self.domains,
            self.stream,
            self.stream_seed,
            self.dirichlet_alpha,
            self.batch_size,
        )
