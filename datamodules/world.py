"""The offline world as a datamodule: the clean domain and every shift, seeded."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset
from typing_extensions import override

from tta.datamodules.preprocess import Preprocess, classification_sample, collate_with_originals
from tta.datamodules.streams import StreamDataModule, check_loader, check_stream, order_within_domains
from tta.status import SlowStep
from tta.validation import check_number
from tta.world import CLASS_NAMES, DOMAINS, ORIGINAL_SIZE, check_domain, render_domain


class TensorDictDataset(Dataset):
    """Samples of the batch contract from rendered scenes stored as uint8: ``original`` the render,
    ``image`` its ``preprocess``-ed model input (computed on access, like a decoded file's)."""

    def __init__(
        self, originals: torch.Tensor, labels: torch.Tensor, domains: list[str], preprocess: Preprocess
    ) -> None:
        self.originals, self.labels, self.domains, self.preprocess = originals, labels, domains, preprocess

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return classification_sample(self.originals[i], self.preprocess, self.labels[i], i, self.domains[i])


class WorldDataModule(StreamDataModule):
    """Single-object scenes of the offline world, ``n_per_domain`` per domain.

    Every domain shows the same scenes (same ``seed``) through its shift, so differences
    between domains are the shift's alone. Scenes are rendered at ``render_size`` px and stored
    as uint8 like decoded files: that render is the batch's ``original`` (view-based methods crop
    their views from it), and ``image`` is made from it as a real image's is, by the model's
    preprocessing (``image_size``, ``resize_mode``, ``interpolation``). The default
    ``render_size`` (``ORIGINAL_SIZE``, 128) is twice the shipped models' input, so views have
    finer detail than the model's input, as real photographs do; the spatial shifts' levels are
    in pixels of the 64 px model input and scale with the render, so a shift's strength at the
    model's input does not depend on ``render_size``. The default ``seed`` is disjoint from the training seeds
    of the shipped model. ``stream`` orders each domain's samples (see
    ``tta.datamodules.streams``: "iid", "sorted" by label, or "dirichlet" class-imbalanced chunks
    of ``batch_size``).
    """

    name = "world"
    class_names = list(CLASS_NAMES)

    def __init__(
        self,
        domains: Sequence[str] | str = "all",
        severity: int = 3,
        n_per_domain: int = 500,
        seed: int = 10_000,
        render_size: int = ORIGINAL_SIZE,
        image_size: int = 64,
        resize_mode: str = "shortest",
        interpolation: str = "bicubic",
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
        check_number("severity", severity, 1, 5, integer=True)
        check_number("n_per_domain", n_per_domain, 1, integer=True)
        check_number("seed", seed, integer=True)
        check_number("render_size", render_size, 1, integer=True)
        check_loader(batch_size, num_workers, stream_seed)
        self.severity, self.n_per_domain, self.seed = int(severity), int(n_per_domain), int(seed)
        self.preprocess = Preprocess(image_size, resize_mode, interpolation)
        self.render_size, self.image_size = int(render_size), int(image_size)
        self.batch_size, self.num_workers = int(batch_size), int(num_workers)
        check_stream(stream, dirichlet_alpha)
        self.stream, self.dirichlet_alpha, self.stream_seed = stream, float(dirichlet_alpha), int(stream_seed)
        self.dataset: TensorDictDataset | None = None
        self.order: torch.Tensor | None = None

    @override
    def setup(self, stage: str) -> None:
        if self.dataset is not None:
            return
        renders, labels, domains = [], [], []
        what = f"rendering {len(self.domains) * self.n_per_domain:,} world scenes"
        with SlowStep(what, total=len(self.domains), unit="domains") as step:
            for domain in self.domains:
                scenes = render_domain(domain, self.severity, self.n_per_domain, self.seed, size=self.render_size)
                renders.append(scenes.originals())
                labels.append(scenes.labels)
                domains += [domain] * self.n_per_domain
                step.advance()
        self.dataset = TensorDictDataset(torch.cat(renders), torch.cat(labels), domains, self.preprocess)
        self.order = order_within_domains(
            self.dataset.labels,
            domains,
            self.domains,
            self.stream,
            self.stream_seed,
            self.dirichlet_alpha,
            self.batch_size,
        )

    @override
    def collate_fn(self) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
        return collate_with_originals
