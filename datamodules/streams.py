"""Test-stream orders: the realistic-stream protocols of the TTA literature.

- ``"iid"``: a seeded random permutation;
- ``"sorted"``: grouped by label (ascending; within a class, the original order);
- ``"dirichlet"``: class-imbalanced chunks: the stream is cut into chunks of ``chunk_size``
  samples and each chunk draws its classes from its own proportions ``pi ~ Dirichlet(alpha)``
  over the classes (classes already used up drop out and the rest are renormalised). Small
  ``alpha`` (0.1) gives chunks dominated by one or two classes; large alpha tends to i.i.d.

Orders are permutations of positions: samples keep their dataset ``index``, so per-sample
seeds (and so episodic methods' predictions) do not depend on the stream.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, DistributedSampler
from typing_extensions import override

from tta.fingerprint import files_fingerprint
from tta.validation import OptionError, check_number

STREAMS = ("iid", "sorted", "dirichlet")


def check_stream(kind: str, alpha: float) -> None:
    if kind not in STREAMS:
        raise OptionError("stream", f"is {kind!r}, not a stream order: choose one of {STREAMS}")
    check_number("dirichlet_alpha", alpha, 0, low_open=True)


def check_loader(batch_size: int, num_workers: int, stream_seed: int) -> None:
    """The loader settings every datamodule shares."""
    check_number("batch_size", batch_size, 1, integer=True)
    check_number("num_workers", num_workers, 0, integer=True)
    check_number("stream_seed", stream_seed, integer=True)


def stream_order(
    labels: torch.Tensor, kind: str = "iid", seed: int = 0, alpha: float = 0.1, chunk_size: int = 64
) -> torch.Tensor:
    """A permutation of ``range(len(labels))`` in the order the stream presents the samples."""
    check_stream(kind, alpha)
    n = len(labels)
    g = torch.Generator().manual_seed(seed)
    if kind == "iid":
        return torch.randperm(n, generator=g)
    if kind == "sorted":
        return torch.sort(labels, stable=True).indices
    classes = labels.unique()
    pools = [(labels == c).nonzero().squeeze(1) for c in classes]
    pools = [pool[torch.randperm(len(pool), generator=g)].tolist() for pool in pools]
    concentration = torch.full((len(classes),), float(alpha))
    order: list[int] = []
    while len(order) < n:
        proportions = torch._sample_dirichlet(concentration, generator=g)
        for _ in range(min(chunk_size, n - len(order))):
            left = torch.tensor([float(bool(pool)) for pool in pools])
            weights = proportions * left
            if weights.sum() <= 0:  # the chunk's classes are used up: fall back to what is left
                weights = left
            pick = int(torch.multinomial(weights, 1, generator=g))
            order.append(pools[pick].pop())
    return torch.tensor(order)


def order_within_domains(
    labels: torch.Tensor,
    domain_of: list[str],
    domains: list[str],
    kind: str = "iid",
    seed: int = 0,
    alpha: float = 0.1,
    chunk_size: int = 64,
) -> torch.Tensor:
    """Positions of all samples in stream order: each domain's samples ordered by
    :func:`stream_order` (domain ``k`` with seed ``seed + k``), domains one after the other in
    ``domains`` order. ``domain_of[i]`` is sample ``i``'s domain."""
    check_stream(kind, alpha)
    order = []
    for k, domain in enumerate(domains):
        positions = torch.tensor([i for i, d in enumerate(domain_of) if d == domain], dtype=torch.long)
        order.append(positions[stream_order(labels[positions], kind, seed + k, alpha, chunk_size)])
    return torch.cat(order) if order else torch.zeros(0, dtype=torch.long)


class StreamSampler(DistributedSampler):
    """The positions one process reads, in stream order: whole batches, never split.

    The stream ``order`` is cut into batches of ``batch_size``; global batch ``g`` goes to rank
    ``g % world_size`` (so batches, and batch-level methods' outputs, are the same on any
    number of devices), and the first ``start_batch`` batches of this rank are left out (a
    resumed run). A ``DistributedSampler`` so that Lightning keeps it rather than injecting its
    own per-sample split under DDP.
    """

    def __init__(
        self, order: torch.Tensor, batch_size: int, rank: int = 0, world_size: int = 1, start_batch: int = 0
    ) -> None:
        # DistributedSampler.__init__ reads torch.distributed when these are None; set what we use only
        self.order, self.batch_size = order.tolist(), int(batch_size)
        self.rank, self.num_replicas, self.start_batch = int(rank), int(world_size), int(start_batch)
        self.epoch, self.shuffle, self.drop_last, self.seed = 0, False, False, 0
        batches = range(0, len(self.order), self.batch_size)
        mine = [
            self.order[start : start + self.batch_size]
            for g, start in enumerate(batches)
            if g % self.num_replicas == self.rank
        ]
        self.n_batches = len(mine)  # this rank's batches in the whole stream, finished ones included
        self.positions = [p for batch in mine[self.start_batch :] for p in batch]
        self.num_samples = self.total_size = len(self.positions)

    def __iter__(self) -> Iterator[int]:
        return iter(self.positions)

    def __len__(self) -> int:
        return len(self.positions)


def global_batch(local_batch: int, rank: int, world_size: int) -> int:
    """The stream position of a rank's ``local_batch``-th batch (see :class:`StreamSampler`)."""
    return local_batch * world_size + rank


class StreamDataModule(pl.LightningDataModule):
    """Base of the datamodules whose prediction set is read in a stream ``order``.

    Subclasses set ``self.dataset`` and ``self.order`` in ``setup``; this base builds the
    prediction loader over :class:`StreamSampler`, which splits the stream into whole batches
    across DDP ranks and lets :class:`tta.callbacks.PredictionWriter` resume a run from its
    first unfinished batch (:meth:`resume_from_batch`).
    """

    batch_size: int
    num_workers: int = 0
    #: Constructor arguments that order, batch or load the samples but never change one: samples
    #: keep their ``index`` (the view store leaves them out of its key).
    ordering_options: tuple[str, ...] = ("batch_size", "num_workers", "stream", "dirichlet_alpha", "stream_seed")
    #: Where constructor arguments are kept for the run key (``tta.callbacks.writer.object_settings``):
    #: the resizing settings live in the datamodule's ``Preprocess``.
    argument_attributes: dict[str, str | None] = {
        "resize_mode": "preprocess.resize_mode",
        "interpolation": "preprocess.interpolation",
    }

    def __init__(self) -> None:
        super().__init__()
        self.start_batch = 0

    def resume_from_batch(self, local_batch: int) -> None:
        """Leave out this process's first ``local_batch`` batches (they are already written)."""
        if local_batch < 0:
            raise ValueError(f"local_batch must be >= 0, got {local_batch}")
        self.start_batch = int(local_batch)

    def stream_position(self, batch_idx: int) -> int:
        """The 1-based position in the whole stream of this process's predict batch ``batch_idx``
        (a resumed run's finished batches and the other DDP processes' counted)."""
        trainer = self.trainer
        rank, world_size = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        return global_batch(self.start_batch + batch_idx, rank, world_size) + 1

    def stream_sampler(self) -> StreamSampler:
        trainer = self.trainer
        rank, world_size = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        return StreamSampler(self.order, self.batch_size, rank, world_size, self.start_batch)

    def collate_fn(self) -> Callable[[list[Any]], Any] | None:
        """How the loader makes a batch of items (``None``: PyTorch's default collate)."""
        return None

    def input_files(self) -> list[Path] | None:
        """The files the prediction set is read from; ``None`` for data made from the settings
        alone (the offline world), whose settings are its content."""
        return None

    def content_fingerprint(self) -> dict[str, Any] | None:
        """The fingerprint of :meth:`input_files` (``tta.fingerprint.files_fingerprint``, paths
        relative to ``root`` where there is one), recorded in the run key so that a rerun over
        files that changed since is refused rather than resumed into the old rows."""
        files = self.input_files()
        return None if files is None else files_fingerprint(files, getattr(self, "root", None))

    @override
    def predict_dataloader(self) -> DataLoader:
        return DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            sampler=self.stream_sampler(),
            num_workers=self.num_workers,
            collate_fn=self.collate_fn(),
        )
